"""bitsandbytes 4-bit bases (NF4/FP4, optional double quant): MatMulBnb4 (exact) or MatMulNBits int4 (serving)."""

from __future__ import annotations

from torch import nn

from ..modules import Bnb4Linear, NBitsLinear
from . import SERVING_ACCURACY_LEVEL, Arithmetic, ExportKind, register_kind


class Bnb4Kind(ExportKind):
    backend_kinds = ("bnb-4bit",)
    quantizations = ("bnb-nf4", "bnb-fp4")
    label = "bnb-nf4 / bnb-fp4"
    twins = "adalora_deploy.export.build.modules.Bnb4Linear.from_bnb (exact) or NBitsLinear.from_bnb_4bit (serving)"

    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        if serving:
            return NBitsLinear.from_bnb_4bit(module, accuracy_level=SERVING_ACCURACY_LEVEL)
        return Bnb4Linear.from_bnb(module)

    def separate(self, *, serving: bool) -> Arithmetic:
        if serving:
            return Arithmetic("MatMulNBits int4, round-to-nearest of the dequantized bnb weight, accuracy_level 4 "
                              "(lossy: re-quantizes the base the adapter was trained on)", "lossy", "lossy")
        return Arithmetic("MatMulBnb4 (bnb's bytes, fp32 dequantize + matmul = bnb training arithmetic)",
                          "exact", "exact")

    def exact_exports(self, quantization: str) -> str:
        data = quantization.removeprefix("bnb-").upper()
        return f"`--mode separate` (MatMulBnb4: the trained {data} bytes, exactly) or `--mode merged` (fp32, exact)"

    def merged(self) -> Arithmetic:
        return Arithmetic("fp32 MatMul of dequant(W0) + ΔW; reproduces bnb Linear4bit's fp32 dequantize-then-matmul "
                          "(training arithmetic)", "exact", "exact")


register_kind(Bnb4Kind())
