"""GPTQ bases (our QuantLinear, 2/4/8-bit, act-order): MatMulNBits with the checkpoint's integers repacked."""

from __future__ import annotations

from torch import nn

from adalora_deploy.errors import ExportError

from ..modules import NBitsLinear
from . import SERVING_ACCURACY_LEVEL, Arithmetic, ExportKind, register_kind


class GPTQKind(ExportKind):
    backend_kinds = ("gptq",)
    quantizations = ("gptq",)
    label = "gptq (2/4/8-bit, act-order)"
    row = 30
    twins = "adalora_deploy.export.build.modules.NBitsLinear.from_gptq"
    trained_int4 = True

    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        # a layer trained with int8 activations (model.activations: int8) is exported at the level it trained on
        int8 = serving or getattr(module, "activation_block", None) is not None
        try:
            return NBitsLinear.from_gptq(module, accuracy_level=SERVING_ACCURACY_LEVEL if int8 else 0)
        except ValueError as error:
            raise ExportError(f"{error}; export with --mode merged instead") from None

    def separate(self, *, serving: bool) -> Arithmetic:
        if serving:
            return Arithmetic("MatMulNBits (GPTQ repacked), accuracy_level 4 (lossy)", "lossy", "lossy")
        return Arithmetic("MatMulNBits (GPTQ repacked exactly, act-order as a K permutation), accuracy_level 0: the "
                          "exact fp32 product s·(q - z) that QuantLinear computes with", "exact", "exact")

    def int8_trained(self, *, mode: str) -> Arithmetic:
        """The arithmetic when the adapter was trained with int8 activations (``model.activations: int8``).

        Separate: the graph runs the trained ops (MatMulNBits accuracy_level 4 on the same blocks), exact when
        both sides see the same int8 codes: ``check`` feeds them, teacher-forced at every quantized op
        (free-running, int8 rounding carries the ulp differences of any two implementations through the
        layers: docs/ONNX.md, "int8 activations are not reproducible"). Merged: fp32 products, lossy."""
        if mode == "separate":
            return Arithmetic("MatMulNBits (GPTQ repacked exactly), accuracy_level 4: the int8 activation blocks the "
                              "adapter was trained with (exact teacher-forced: the same codes give the same numbers)",
                              "exact", "exact")
        return Arithmetic("fp32 MatMul of dequant(W0) + ΔW; the int8 activations of training are not reproduced",
                          "exact", "lossy")

    def exact_exports(self, quantization: str) -> str:
        return ("`--mode separate` (the trained int4 GPTQ weights, exactly, in MatMulNBits; add `--serving` for "
                "int8-activation kernels, checked lossy)")

    def merged(self) -> Arithmetic:
        return Arithmetic("fp32 MatMul of dequant(W0) + ΔW; reproduces QuantLinear's exact fp32 dequantized weight",
                          "exact", "exact")


register_kind(GPTQKind())
