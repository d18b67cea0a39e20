"""bitsandbytes LLM.int8 bases: exact MatMulInteger emulation, or MatMulNBits 8-bit (serving)."""

from __future__ import annotations

from torch import nn

from ..modules import Int8EmulationLinear, NBitsLinear
from . import SERVING_ACCURACY_LEVEL, Arithmetic, ExportKind, register_kind


class Bnb8Kind(ExportKind):
    backend_kinds = ("bnb-int8",)
    quantizations = ("bnb-int8",)
    label = "bnb-int8"
    twins = "adalora_deploy.export.build.modules.Int8EmulationLinear.from_bnb (exact) or NBitsLinear.from_bnb_int8 (serving)"

    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        if serving:
            return NBitsLinear.from_bnb_int8(module, accuracy_level=SERVING_ACCURACY_LEVEL)
        return Int8EmulationLinear.from_bnb(module)

    def separate(self, *, serving: bool) -> Arithmetic:
        if serving:
            return Arithmetic("MatMulNBits 8-bit (code CB + 128, scale SCB/127), accuracy_level 4 (lossy)",
                              "lossy", "lossy")
        return Arithmetic("MatMulInteger emulation of LLM.int8's eval forward (fp16 activations, row int8 "
                          "quantization, outlier columns in float)", "exact", "exact")

    def exact_exports(self, quantization: str) -> str:
        return "`--mode separate` (exact LLM.int8 emulation)"

    def merged(self) -> Arithmetic:
        return Arithmetic("fp32 MatMul of dequant(W0) + ΔW; does not reproduce LLM.int8's int8 activations (lossy "
                          "against the bnb model)", "exact", "lossy")


register_kind(Bnb8Kind())
