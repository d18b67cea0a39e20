"""Dense bases (``nn.Linear``, GPT-2's ``Conv1D``): the layer is its own twin, a plain fp32 MatMul."""

from __future__ import annotations

from torch import nn

from . import Arithmetic, ExportKind, register_kind


class DenseKind(ExportKind):
    backend_kinds = ("dense", "dense-conv1d")
    quantizations = ("none",)
    label = "none"
    row = 0

    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        return module

    def separate(self, *, serving: bool) -> Arithmetic:
        return Arithmetic("fp32 MatMul", "exact", "exact")

    def exact_exports(self, quantization: str) -> str:
        return "`--mode merged` (fp32, exact) or `--mode separate`"

    def merged(self) -> Arithmetic:
        return Arithmetic("fp32 MatMul of W0 + ΔW; reproduces the fp32 adapted model up to summation order",
                          "exact", "exact")


register_kind(DenseKind())
