"""bitsandbytes LLM.int8 bases: exact MatMulInteger emulation, or MatMulNBits 8-bit (serving).

The whole kind: the custom op :func:`int8_lt_matmul` (the eager arithmetic), its node pattern
:func:`int8_lt_pattern` (registered as a ``contrib.PatternOp``, which both builders emit), the twin
:class:`Int8EmulationLinear` and the :class:`Bnb8Kind` record (arithmetic, tier, advice).
"""

from __future__ import annotations

from typing import Sequence

import onnx
import torch
from torch import nn

from adalora_deploy.backends.bnb import dequantize_int8, linear8bit_state

from .. import contrib
from ..modules import NBitsLinear
from . import SERVING_ACCURACY_LEVEL, Arithmetic, ExportKind, register_kind

__all__ = ["BNB_INV_127_SQUARED", "INT8_LT", "Bnb8Kind", "Int8EmulationLinear", "int8_lt_matmul", "int8_lt_pattern"]

BNB_INV_127_SQUARED = 6.200124e-05
"""bitsandbytes' int8_mm_dequant constant for 1 / 127**2."""


@torch.library.custom_op("adalora_export::int8_lt_matmul", mutates_args=())
def int8_lt_matmul(
    x: torch.Tensor, cb_t: torch.Tensor, scb: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, threshold: float
) -> torch.Tensor:
    """bitsandbytes LLM.int8 eval forward (0.50 default kernels), written out so ONNX can reproduce it.

    Args:
        x: [..., K] activations.
        cb_t: int8 [K, N] weight codes (``CB.T``).
        scb: fp32 [N] per-output absmax (``SCB``).
        weight_t: fp32 [K, N] dequantized weight ``(CB * SCB * (1/127)).T`` for the outlier columns.
        bias: fp32 [N] (zeros when the layer has none).
        threshold: outlier threshold (<= 0: no outlier decomposition).
    """
    k, n = cb_t.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    a = x2.to(torch.float16).float()
    outlier_cols = None
    if threshold > 0:
        big = a.abs() >= threshold
        outlier_cols = big.any(dim=0)
        a = a.masked_fill(big, 0.0)
    row_stats = a.abs().amax(dim=1, keepdim=True)
    q = torch.round(a * (row_stats.reciprocal() * 127.0))  # torch evaluates 127.0 / t as t.reciprocal() * 127
    if outlier_cols is not None:
        q = q.masked_fill(outlier_cols, 0.0)
    acc = torch.matmul(q.to(torch.int64), cb_t.to(torch.int64)).to(torch.int32)  # exact integer products
    out = acc.float() * (row_stats * scb.unsqueeze(0)) * BNB_INV_127_SQUARED + bias
    if outlier_cols is not None:
        out = out + torch.matmul(x2.float().masked_fill(~outlier_cols, 0.0), weight_t)
    return out.reshape(*lead, n).to(x.dtype)


@int8_lt_matmul.register_fake
def _(x, cb_t, scb, weight_t, bias, threshold):
    return x.new_empty((*x.shape[:-1], cb_t.shape[1]))


def int8_lt_pattern(b: contrib.PatternBuilder, x, threshold: float):
    """The nodes of :func:`int8_lt_matmul`, written once for both builders (the LLM.int8 lowering)::

        x ─> Reshape[-1,K] ─> Cast(fp16) ─> Cast(fp32) = a
         a ─> Abs ─> GreaterOrEqual(threshold) = big ─> Cast ─> ReduceMax(rows) ─> Cast(bool) = outlier_cols
         a ─> Where(big, 0) ─> Abs ─> ReduceMax(cols) = row_stats ─> Reciprocal ─> Mul(127) = s
         Mul(a, s) ─> Round ─> Where(outlier_cols, 0) ─> Cast(int8) ─> MatMulInteger(cb_t) ─> Cast(fp32)
           ─> Mul(row_stats * scb) ─> Mul(1/127^2) ─> Add(bias) ─> Add(MatMul(Where(outlier_cols, x, 0), weight_t))
           ─> Reshape[..., N]

    The outlier nodes exist only with ``threshold > 0``. ``127 / row_stats`` is Reciprocal then Mul, as torch
    evaluates it (a Div flips .5 rounding ties)."""
    F, B, I8 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL, onnx.TensorProto.INT8
    lead, x2, n = b.rows(x, "cb_t")
    a = b.op("Cast", b.op("Cast", x2, to=onnx.TensorProto.FLOAT16), to=F)
    zero = b.float(0.0)
    if threshold > 0:
        big = b.op("GreaterOrEqual", b.op("Abs", a), b.float(threshold))
        outlier_cols = b.op("Cast", b.op("ReduceMax", b.op("Cast", big, to=F), b.ints(0), keepdims=1), to=B)
        a = b.op("Where", big, zero, a)
    row_stats = b.op("ReduceMax", b.op("Abs", a), b.ints(1), keepdims=1)
    scale = b.op("Mul", b.op("Reciprocal", row_stats), b.float(127.0))
    q = b.op("Round", b.op("Mul", a, scale))
    if threshold > 0:
        q = b.op("Where", outlier_cols, zero, q)
    acc = b.op("MatMulInteger", b.op("Cast", q, to=I8), b.tensor("cb_t"))
    out = b.op("Mul", b.op("Cast", acc, to=F), b.op("Mul", row_stats, b.op("Unsqueeze", b.tensor("scb"), b.ints(0))))
    out = b.op("Add", b.op("Mul", out, b.float(BNB_INV_127_SQUARED)), b.tensor("bias"))
    if threshold > 0:
        out = b.op("Add", out, b.op("MatMul", b.op("Where", outlier_cols, x2, zero), b.tensor("weight_t")))
    return b.op("Reshape", out, b.op("Concat", lead, n, axis=0))


INT8_LT = contrib.register_op(contrib.PatternOp(
    "the LLM.int8 emulation", "int8_lt_matmul", ("cb_t", "scb", "weight_t", "bias"), (("threshold", float),),
    int8_lt_pattern, n_axes=(1, 0, 1, 0), quantized_op="MatMulInteger"))
"""The LLM.int8 lowering: :func:`int8_lt_matmul` as :func:`int8_lt_pattern`; siblings fuse along N (``cb_t`` and
``weight_t`` are ``[K, N]``)."""


class Int8EmulationLinear(nn.Module):
    """Exact ONNX emulation of bitsandbytes ``Linear8bitLt``'s eval forward (LLM.int8, arXiv:2208.07339).

    With ``a = fp16(x)``, outlier elements ``|a| >= threshold`` (and their whole columns) go through a
    float matmul; the rest is row-quantized ``q = round(a * 127 / max|a_row|)`` and multiplied in int32::

        y = (q @ CB.T) * row_stats * SCB / 127**2 + bias + x[:, outlier_cols] @ W[:, outlier_cols].T

    ONNX: Cast/Abs/GreaterOrEqual/Where/ReduceMax/Reciprocal/Mul/Round, MatMulInteger, Mul, Add, MatMul (the
    node diagram is on :func:`int8_lt_pattern`, which both builders emit). ``127 / row_stats``
    is Reciprocal then Mul, as torch evaluates it; a Div flips .5 rounding ties. Slow on CPU: for serving,
    prefer :meth:`NBitsLinear.from_bnb_int8`.
    """

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, *, threshold: float, bias: torch.Tensor | None = None) -> None:
        """Args:
        cb: int8 ``[N, K]`` weight codes.
        scb: ``[N]`` per-output absmax.
        threshold: outlier threshold (bnb's ``llm_int8_threshold``; <= 0 disables outliers).
        bias: optional ``[N]``.
        """
        super().__init__()
        if cb.dtype != torch.int8 or cb.dim() != 2 or scb.shape != (cb.shape[0],):
            raise ValueError(f"Int8EmulationLinear: expected int8 CB [N, K] and SCB [N], got {cb.dtype} "
                             f"{tuple(cb.shape)} and {tuple(scb.shape)}")
        self.out_features, self.in_features = cb.shape
        self.threshold = float(threshold)
        scb = scb.float()
        self.register_buffer("cb_t", cb.T.contiguous())
        self.register_buffer("scb", scb.contiguous())
        self.register_buffer("weight_t", dequantize_int8(cb, scb).T.contiguous())
        self.register_buffer("bias", torch.zeros(self.out_features) if bias is None else bias.detach().float().clone())

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> Int8EmulationLinear:
        """From a quantized bitsandbytes ``Linear8bitLt`` (CB/SCB and its threshold)."""
        cb, scb, threshold = linear8bit_state(layer)
        return cls(cb, scb, threshold=threshold, bias=layer.bias)

    def lowering(self) -> contrib.PatternNode:
        """The LLM.int8 pattern both builders emit (bias included), fp32 graphs only."""
        return contrib.PatternNode(INT8_LT, (self.cb_t, self.scb, self.weight_t, self.bias), (self.threshold,),
                                   float32_only=True)

    def can_fuse_with(self, others: Sequence[nn.Module]) -> bool:
        """Siblings (same type and K) concatenate along N into one pattern when their thresholds agree."""
        return all(b.threshold == self.threshold for b in others)

    # the node graph is drawn on int8_lt_pattern
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowering()(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


class Bnb8Kind(ExportKind):
    backend_kinds = ("bnb-int8",)
    quantizations = ("bnb-int8",)
    label = "bnb-int8"
    row = 20
    twins = ("adalora_deploy.export.build.kinds.bnb8.Int8EmulationLinear.from_bnb (exact) or "
             "adalora_deploy.export.build.modules.NBitsLinear.from_bnb_int8 (serving)")

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
