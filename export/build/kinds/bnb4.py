"""bitsandbytes 4-bit bases (NF4/FP4, optional double quant): MatMulBnb4 (exact) or MatMulNBits int4 (serving).

The whole kind: onnxruntime's ``com.microsoft.MatMulBnb4`` (its schema, the custom op :func:`matmul_bnb4` with
the eager arithmetic, and :data:`MATMUL_BNB4`, the ``contrib.ContribOp`` both builders emit), the twin
:class:`Bnb4Linear` and the :class:`Bnb4Kind` record (arithmetic, tier, advice).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from adalora_deploy.backends.bnb import dequantize_bnb4, linear4bit_state

from .. import contrib
from ..modules import NBitsLinear
from . import SERVING_ACCURACY_LEVEL, Arithmetic, ExportKind, register_kind

__all__ = ["MATMUL_BNB4", "Bnb4Kind", "Bnb4Linear", "matmul_bnb4"]

contrib.register_schema(contrib.contrib_schema(
    "MatMulBnb4",
    [("A", "T1", False), ("B", "T2", False), ("absmax", "T1", False)],
    [("Y", "T1")],
    [("K", True, 0), ("N", True, 0), ("block_size", True, 0), ("quant_type", True, 0),
     ("training_mode", False, 0), ("transB", False, 1)],
    [("T1", contrib.FLOAT_TYPES, ""), ("T2", ["tensor(uint8)"], "")],
))


@torch.library.custom_op("adalora_export::matmul_bnb4", mutates_args=())
def matmul_bnb4(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, K: int, N: int, block_size: int, quant_type: int
) -> torch.Tensor:
    """``x @ W.T`` with W from :func:`dequantize_bnb4` (what MatMulBnb4 and bnb's CPU forward compute)."""
    weight = dequantize_bnb4(packed, absmax, K, N, block_size, quant_type).to(x.dtype)
    return torch.matmul(x, weight.T)


@matmul_bnb4.register_fake
def _(x, packed, absmax, K, N, block_size, quant_type):
    return x.new_empty((*x.shape[:-1], N))


MATMUL_BNB4 = contrib.register_op(contrib.ContribOp("MatMulBnb4", "matmul_bnb4", ("packed", "absmax"),
                                                    ("K", "N", "block_size", "quant_type")))


class Bnb4Linear(nn.Module):
    """bitsandbytes 4-bit weights (NF4/FP4) served by onnxruntime ``com.microsoft.MatMulBnb4``.

    The packed bytes are bnb's own (first element in the high nibble); double-quant statistics are
    dequantized to fp32 absmax at construction. Exact vs bnb's forward (fp32 compute).

    ::

        x ──> MatMulBnb4(packed, absmax) ──> Add(bias) ──> y
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        *,
        in_features: int,
        out_features: int,
        block_size: int,
        quant_type: str,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Args:
        packed: uint8 ``[(N * K + 1) // 2]`` bnb-packed codes of the row-major ``[N, K]`` weight.
        absmax: fp32 ``[ceil(N * K / block_size)]``.
        in_features, out_features: K and N.
        block_size: bnb blocksize.
        quant_type: ``"nf4"`` or ``"fp4"``.
        bias: optional ``[N]``.
        """
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"Bnb4Linear: quant_type {quant_type!r} is not 'nf4' or 'fp4'")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.quant_type = quant_type
        self.register_buffer("packed", packed.reshape(-1).to(torch.uint8).contiguous())
        self.register_buffer("absmax", absmax.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> Bnb4Linear:
        """From a quantized bitsandbytes ``Linear4bit`` (nf4/fp4, with or without double quant)."""
        state = linear4bit_state(layer)
        return cls(state.packed, state.absmax, in_features=state.in_features, out_features=state.out_features,
                   block_size=state.block_size, quant_type=state.quant_type, bias=layer.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]``."""
        return dequantize_bnb4(self.packed, self.absmax, self.in_features, self.out_features,
                               self.block_size, 1 if self.quant_type == "nf4" else 0)

    def lowering(self) -> contrib.ContribNode:
        """The MatMulBnb4 node both builders emit (the bias stays outside it)."""
        return contrib.ContribNode(
            MATMUL_BNB4, (self.packed, self.absmax),
            (self.in_features, self.out_features, self.block_size, 1 if self.quant_type == "nf4" else 0),
            float32_only=True)

    def can_fuse_with(self, others: Sequence[nn.Module]) -> bool:
        """Siblings (same type and K) concatenate along N into one node with the same blocks and codes: bnb
        blocks run over the flattened ``[N, K]`` weight, so every member but the last ends on a block boundary."""
        bases = [self, *others]
        return all((b.block_size, b.quant_type) == (self.block_size, self.quant_type) for b in bases) and all(
            (int(b.out_features) * int(b.in_features)) % (2 * int(b.block_size)) == 0 for b in bases[:-1])

    # x ──> com.microsoft.MatMulBnb4 ──> [Add(bias)] ──> y
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowering()(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, block_size={self.block_size}")


class Bnb4Kind(ExportKind):
    backend_kinds = ("bnb-4bit",)
    quantizations = ("bnb-nf4", "bnb-fp4")
    label = "bnb-nf4 / bnb-fp4"
    row = 10
    twins = ("adalora_deploy.export.build.kinds.bnb4.Bnb4Linear.from_bnb (exact) or "
             "adalora_deploy.export.build.modules.NBitsLinear.from_bnb_4bit (serving)")

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
