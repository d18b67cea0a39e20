"""Quantizing one weight: round-to-nearest and the GPTQ solver (the one place their arithmetic is written).

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323, Algorithm 1) quantizes the columns of ``W (out, in)`` left to right
and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian of the layer's squared output error::

    H = 2 X^T X / N           X (N tokens, in): the layer's calibration inputs
    H += percdamp * mean(diag H) * I
    U = chol(H^-1)^T          upper triangular
    for column j:  q_j = quant(w_j);  e = (w_j - q_j) / U[j, j];  w_{j+1:} -= e U[j, j+1:]

Errors inside a block of ``block_size`` columns are applied immediately; the block's accumulated error
reaches the remaining columns with one matmul (the "lazy batch" update of Section 4).

Both return a :class:`QuantizedWeight` (integers, scales, zeros, g_idx), which packs into a GPTQ
:class:`~adalora_deploy.gptq.linear.QuantLinear` or an onnxruntime MatMulNBits layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq.linear import QuantLinear
from adalora_deploy.gptq.packing import SUPPORTED_BITS, default_g_idx

__all__ = [
    "HessianAccumulator",
    "QuantizedWeight",
    "RtnScheme",
    "check_settings",
    "gptq_quantize",
    "group_aware_order",
    "one_intra_op_thread",
    "rtn_blocks",
    "rtn_quantize",
]

_MIN_SCALE = torch.finfo(torch.float16).tiny
"""Smallest normal fp16 (6.1e-5): scales are stored in fp16, and a scale that underflows to 0 would
turn every value of its group into inf/nan; a group this flat dequantizes to zeros instead."""
_MAX_SCALE = torch.finfo(torch.float16).max
"""Largest fp16 (65504): a larger scale cannot be stored in the checkpoint."""


@dataclass(frozen=True)
class QuantizedWeight:
    """Quantized integers and their grid for one weight ``(out, in)``, ready to pack.

    Attributes:
        q: int32 ``(out, in)`` values in ``[0, 2**bits)``, columns in the original order.
        scales: float32 ``(G, out)``, already rounded to their storage precision (fp16 for GPTQ checkpoints).
        zeros: int32 ``(G, out)`` zero points.
        g_idx: int32 ``(in,)`` group of each input channel.
        bits, group_size, sym, desc_act: the settings that produced them.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    desc_act: bool

    def to_module(self, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq_v2"):
        """Pack into a :class:`~adalora_deploy.gptq.linear.QuantLinear`."""
        return QuantLinear.from_quantized(
            self.q,
            self.scales,
            self.zeros,
            self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            desc_act=self.desc_act,
            bias=bias,
            checkpoint_format=checkpoint_format,
        )

    def dequantize(self) -> torch.Tensor:
        """float32 ``(out, in)``, the exact product :class:`QuantLinear` computes with."""
        g = self.g_idx.long()
        return self.scales.float().t()[:, g] * (self.q - self.zeros.t()[:, g]).float()


def check_settings(bits: int, group_size: int) -> None:
    """Raise :class:`QuantizationError` for unsupported bits or a group size that is neither -1 nor >= 1."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise QuantizationError(f"group_size must be -1 (one group) or >= 1, got {group_size}")


def _grid(x: torch.Tensor, bits: int, sym: bool,
          scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of ``x (out, k)`` (GPTQ's ``Quantizer.find_params``; the range includes 0).

    sym: ``scale = 2 max|x| / maxq``, ``zero = 2**(bits-1)``. asym: ``scale = (max - min) / maxq``,
    ``zero = round(-min / scale)``. Scales are rounded to ``scale_dtype``, the precision they are stored in
    (fp16 in GPTQ checkpoints, fp32 in MatMulNBits).
    """
    maxq = 2**bits - 1
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if scale_dtype == torch.float16:
        if bool((scale > _MAX_SCALE).any()):
            raise QuantizationError(f"a weight group spans {float((xmax - xmin).max()):.3g}, too large for an fp16 scale")
        scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).float()
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


@contextmanager
def one_intra_op_thread():
    """Run torch ops on one thread inside the block, restoring the thread count after.

    The GPTQ column loop is thousands of tiny ops and the factorizations are small; split over threads
    each op waits for the slowest one, and on a busy machine that wait dominates: on the shared 2-core
    machine of this project one ``gptq_quantize`` of a 960x576 weight took 14-22 s with 2 threads and
    0.4 s with 1, and ``cholesky_inverse`` of a 1536x1536 Hessian 8 s vs 0.25 s.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


RtnScheme = Literal["asym", "sym", "sym-onnx"]


def rtn_blocks(rows: np.ndarray, bits: int, block_size: int, scheme: RtnScheme = "asym",
               scale_dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest codes of float32 rows ``[r, K]``, one grid per block of ``block_size`` along K.

    The one round-to-nearest of the project (GPTQ checkpoints and onnxruntime MatMulNBits both use it)::

        asym      scale = (max - min) / maxq with min <= 0 <= max,  zero = round(-min / scale)
        sym       scale = 2 max|w| / maxq,                           zero = 2^(bits-1)   (GPTQ's symmetric grid)
        sym-onnx  scale = m / -2^(bits-1), m the element of largest magnitude (it maps to code 0),
                  zero = 2^(bits-1)   (onnxruntime's and the genai builder's int4 default: every zero point is
                  MatMulNBits' default, so the graph can leave them out)
        q = clamp(round(w / scale) + zero, 0, maxq)

    An all-zero block gets the range [-1, 1] (its codes dequantize to 0 whatever the scale). Scales are rounded
    to ``scale_dtype`` before the codes are computed (float16 for GPTQ checkpoints, float32 for MatMulNBits).
    numpy on purpose: the same IEEE float32 operations as torch, without one thread-pool barrier per
    elementwise op, which on a loaded 2-core machine made a torch version of a SmolLM2 conversion 5-10x slower.

    Returns:
        ``(q uint8 [r, k_blocks, block_size], scale float32 [r, k_blocks], zero uint8 [r, k_blocks])``; the
        padding of a partial last block stores code 0.

    Raises:
        QuantizationError: a block whose scale overflows float16.
    """
    r, k = rows.shape
    k_blocks = -(-k // block_size)
    maxq = (1 << bits) - 1
    rows = np.asarray(rows, dtype=np.float32)
    if k_blocks * block_size != k:
        rows = np.pad(rows, ((0, 0), (0, k_blocks * block_size - k)))
    blocks = rows.reshape(r, k_blocks, block_size)
    lo = np.minimum(blocks.min(-1), 0)
    hi = np.maximum(blocks.max(-1), 0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = np.where(flat, np.float32(-1), lo), np.where(flat, np.float32(1), hi)
    if scheme == "sym-onnx":
        scale = np.where(-lo > hi, lo, hi) / np.float32(-(1 << (bits - 1)))
    elif scheme == "sym":
        scale = np.float32(2) * np.maximum(-lo, hi) / np.float32(maxq)
    elif scheme == "asym":
        scale = (hi - lo) / np.float32(maxq)
    else:
        raise QuantizationError(f"rtn scheme must be asym, sym or sym-onnx, got {scheme!r}")
    if np.dtype(scale_dtype) == np.float16:
        if bool((np.abs(scale) > _MAX_SCALE).any()):
            raise QuantizationError(f"a weight group spans {float(np.abs(scale).max() * maxq):.3g}, too large for an "
                                    "fp16 scale")
        scale = np.maximum(scale, _MIN_SCALE).astype(np.float16).astype(np.float32)
    if scheme == "asym":
        zero = np.clip(np.round(-lo / scale), 0, maxq)
    else:
        zero = np.full(scale.shape, 1 << (bits - 1), dtype=np.float32)
    q = blocks / scale[..., None]
    np.round(q, out=q)
    q += zero[..., None]
    np.clip(q, 0, maxq, out=q)
    q = q.astype(np.uint8)
    if k_blocks * block_size != k:
        q.reshape(r, -1)[:, k:] = 0
    return q, scale.astype(np.float32, copy=False), zero.astype(np.uint8)


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int = 128, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight (out, in)`` per group of ``group_size`` input channels.

    The baseline GPTQ is compared against: :func:`rtn_blocks` with GPTQ's grid (``sym`` or ``asym``), every
    value rounded independently. ``scale_dtype``: fp16 for GPTQ checkpoints, fp32 for MatMulNBits.
    """
    check_settings(bits, group_size)
    w = weight.detach().float().cpu().numpy()
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    q, scale, zero = rtn_blocks(w, bits, size, "sym" if sym else "asym",
                                np.float16 if scale_dtype == torch.float16 else np.float32)
    device = weight.device
    return QuantizedWeight(
        q=torch.from_numpy(q.reshape(out_features, -1)[:, :in_features].astype(np.int32)).to(device),
        scales=torch.from_numpy(scale.T.copy()).to(device),
        zeros=torch.from_numpy(zero.T.astype(np.int32)).to(device),
        g_idx=default_g_idx(in_features, group_size, device),
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
    )


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, shape: tuple[int, int]) -> torch.Tensor:
    """``U = chol(H^-1)^T`` (upper, ``U^T U = H^-1``) of the damped Hessian, in float64, returned as float32.

    With ``P`` the order reversal and ``P H P = M M^T`` (Cholesky), ``H^-1 = (P M^-T P)(P M^-1 P)`` and
    ``P M^-1 P`` is upper triangular with a positive diagonal, so ``U = P M^-1 P``: one Cholesky and one
    triangular inverse instead of Cholesky, ``cholesky_inverse`` and a second Cholesky (0.18 s vs 0.25 s
    CPU for 1536 columns; equal to 1e-13). float64 keeps the inverse accurate when activation outliers
    spread ``diag(H)`` over many orders of magnitude.

    Raises:
        QuantizationError: ``H`` is not positive definite after damping.
    """
    H = hessian.to(torch.float64)
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    M, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise QuantizationError(
            f"the Hessian of a {shape[0]}x{shape[1]} layer is not positive definite after damping "
            f"(percdamp={percdamp}); raise percdamp or use more calibration samples"
        )
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    return torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1).to(torch.float32)


def group_aware_order(diag: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GAR's visiting order: full groups by decreasing max ``diag(H)``, columns inside each group by
    decreasing ``diag(H)``, a partial last group last and in place.

    Returns:
        ``perm`` (position -> channel) and ``group_order`` (k-th visited group -> natural group index).
    """
    columns = diag.shape[0]
    full = columns // group_size
    values, local = diag[: full * group_size].view(full, group_size).sort(dim=1, descending=True, stable=True)
    order = torch.argsort(values[:, 0], descending=True, stable=True)
    base = torch.arange(full, device=diag.device).unsqueeze(1) * group_size
    perm = (local + base)[order].reshape(-1)
    if full * group_size < columns:
        perm = torch.cat([perm, torch.arange(full * group_size, columns, device=diag.device)])
        order = torch.cat([order, torch.tensor([full], device=diag.device)])
    return perm, order


def _solve_columns(
    Wt: torch.Tensor,
    codes_t: torch.Tensor,
    Hinv: torch.Tensor,
    scales: list[torch.Tensor],
    zeros: list[torch.Tensor],
    bits: int,
    sym: bool,
    group_size: int,
    block_size: int,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
) -> None:
    """The column loop of GPTQ on ``Wt (in, out)`` (updated in place; column ``j`` of ``W`` is the contiguous
    row ``j`` of ``Wt``), writing codes to ``codes_t`` and appending each group's grid to ``scales``/``zeros``;
    ``scale``/``zero`` is the grid of a single group (``group_size == -1``). A column is dequantized as
    QuantLinear does: the exact float32 product of the fp16 scale and the integer."""
    maxq = 2**bits - 1
    columns = Wt.shape[0]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = Wt[i1:i2]  # a view: updates land in Wt
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        pivots = torch.diagonal(Hinv1).tolist()
        for i in range(count):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = _grid(Wt[i1 + i : i1 + i + group_size].t(), bits, sym)
                scales.append(scale)
                zeros.append(zero)
            w = W1[i]
            q = torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)
            codes_t[i1 + i] = q
            err = Err1[i]
            torch.sub(w, q.sub_(zero).mul_(scale), out=err)
            err.div_(pivots[i])
            if i + 1 < count:
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
        if i2 < columns:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_group_aware: bool = False,
) -> QuantizedWeight:
    """GPTQ (arXiv:2210.17323, Algorithm 1) for one weight.

    Rows are independent given ``H``: weights of several linears that read the same input can be stacked
    along ``out`` and solved in one call with the same result (the driver does so for q/k/v and gate/up).

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)``, ``2 X^T X / N`` of the layer inputs (see :class:`HessianAccumulator`).
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale/zero group (-1: one group per row). With ``desc_act``,
            groups are formed in the permuted (act) order; ``g_idx`` records them.
        sym: symmetric grid (zero ``2**(bits-1)``) or asymmetric.
        desc_act: visit columns by decreasing ``diag(H)`` (act-order).
        percdamp: damping ``percdamp * mean(diag(H))`` added to the diagonal.
        block_size: columns per lazy-batch block.
        act_group_aware: group-aware reordering (GAR, Gafni et al., arXiv:2505.14638; gptqmodel's
            default): visit the groups by decreasing largest ``diag(H)`` and the columns of each group
            by decreasing ``diag(H)``, while every group keeps its natural channels ``i // group_size``,
            so ``g_idx`` stays the default and the checkpoint is an ordinary ``desc_act=False`` one.
            Needs ``group_size != -1``; ignored with ``desc_act``.

    Returns:
        The quantized weight; ``q`` columns in the original order.

    Raises:
        QuantizationError: bad settings, shape mismatch, or a Hessian that stays singular after damping.
    """
    check_settings(bits, group_size)
    if block_size < 1:
        raise QuantizationError(f"block_size must be >= 1, got {block_size}")
    if percdamp < 0:
        raise QuantizationError(f"percdamp must be >= 0, got {percdamp}")
    W = weight.detach().float().clone()
    out_features, columns = W.shape
    if tuple(hessian.shape) != (columns, columns):
        raise QuantizationError(
            f"hessian must be ({columns}, {columns}) for a weight {tuple(W.shape)}, got {tuple(hessian.shape)}"
        )
    H = hessian.detach().float().clone()

    # Inputs that are always zero: their weights cannot matter, and H needs a nonzero pivot.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if group_size == -1:
        scale, zero = _grid(W, bits, sym)
        scales, zeros = [scale], [zero]
    else:
        scale = zero = None
        scales, zeros = [], []

    group_order = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
    elif act_group_aware and group_size != -1 and columns >= group_size:
        perm, group_order = group_aware_order(torch.diag(H), group_size)
    else:
        perm = None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(columns, device=W.device)

    # Blocks never split a group mid-way unless the group started the block: a group's grid is then
    # always computed from fully error-updated weights.
    if group_size != -1:
        if group_size <= block_size:
            block_size -= block_size % group_size
        elif group_size % block_size:
            block_size = group_size

    Wt = W.t().contiguous()
    codes_t = torch.empty_like(Wt)
    with one_intra_op_thread():
        Hinv = _inverse_hessian_factor(H, percdamp, (out_features, columns))
        _solve_columns(Wt, codes_t, Hinv, scales, zeros, bits, sym, group_size, block_size, scale, zero)

    invperm = torch.argsort(perm)
    codes = codes_t.t()[:, invperm]
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    if group_size == -1:
        g_idx = torch.zeros(columns, dtype=torch.int32, device=W.device)
    elif group_order is not None:
        # The k-th group visited is natural group group_order[k]: put its grid back in that row.
        scales[group_order], zeros[group_order] = scales.clone(), zeros.clone()
        g_idx = default_g_idx(columns, group_size, W.device)
    else:
        # Channel c was visited at position invperm[c]; groups are consecutive in visiting order.
        g_idx = torch.div(invperm, group_size, rounding_mode="floor").to(torch.int32)
    return QuantizedWeight(
        q=codes.to(torch.int32),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
    )


class HessianAccumulator:
    """Running ``H = 2 X^T X / N`` over batches of layer inputs (float32, ``(in, in)``)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs ``(..., in)``; the running mean keeps the entries O(1) whatever ``N`` becomes."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        # One fused GEMM: H <- (N_old / N) H + (2 / N) x^T x.
        self.hessian.addmm_(x.t(), x, beta=self.num_tokens / total, alpha=2 / total)
        self.num_tokens = total
