"""onnxruntime's CPU int8 compute path for 4/8-bit weights (MatMulNBits ``accuracy_level`` 4), in torch.

The fast CPU kernels of MatMulNBits (MLAS ``sqnbitgemm``, compute type CompInt8) do not multiply the
activations in fp32. Each activation row is quantized to int8 per block of ``block_size`` values along K
(the weight's block size), as ``QuantizeARow_CompInt8`` does on AVX2/AVX-512::

    amax   = max |a[k0 : k0 + block]|                      (fp32)
    scale  = amax / 127                                   (fp32 division)
    codes  = round_half_to_even(a * (127 / amax))         (0 when amax == 0; |codes| <= 127)
    y[n]   = sum over blocks of  scale_a * scale_w[n] * sum_k codes[k] * (q[n, k] - zero[n])

The integer dot products are exact, so dequantizing the codes (``codes * scale``) and multiplying by the
dequantized fp32 weight computes the same numbers up to fp32 summation order. That is what
:func:`fake_quantize_activations` gives a training forward: the arithmetic the exported graph runs, with a
straight-through gradient (the rounding's derivative taken as 1, the usual estimator for quantization-aware
training). ``tests/test_int8_compute.py`` proves it op by op against onnxruntime's MatMulNBits (decode M=1
and prefill shapes, every block size, partial last blocks, random and real activations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adalora_deploy.errors import ConfigError

__all__ = ["ACTIVATION_CODE_MAX", "MAX_BLOCK", "WEIGHT_ZERO_POINT", "fake_quantize_activations", "fake_quantize_weights",
           "nbits_block_size", "quantize_activations", "weight_codes"]

ACTIVATION_CODE_MAX = 127.0
"""Largest int8 activation code: MLAS maps the block's largest magnitude to +-127 (never -128)."""
WEIGHT_ZERO_POINT = 128
"""MatMulNBits' default zero point of 8-bit weights: a symmetric code c in [-127, 127] is stored as c + 128."""
MAX_BLOCK = 256
"""Largest MatMulNBits block our exporter emits (onnxruntime's CPU kernels take 16..256 for every bit width)."""


def nbits_block_size(group_size: int, in_features: int) -> int:
    """The MatMulNBits ``block_size`` a GPTQ layer of this group size is exported with.

    It is also the activation block of the int8 compute path, so training and export must agree on it:
    the largest power of two in [16, 256] dividing the group (each block inside one group); a single group
    (``-1`` or ``>= in_features``) takes the power of two covering K, at most 128.

    Raises:
        ConfigError: a group size that no MatMulNBits block fits (not a multiple of 16).
    """
    group = in_features if group_size == -1 else group_size
    if group >= in_features:
        return min(MAX_BLOCK // 2, max(16, 1 << math.ceil(math.log2(in_features))))
    for block in (256, 128, 64, 32, 16):
        if group % block == 0:
            return block
    raise ConfigError(
        f"group_size {group_size} is not a multiple of 16: onnxruntime's MatMulNBits needs power-of-two blocks "
        f">= 16 inside one group; quantize with group_size 32, 64 or 128"
    )


def quantize_activations(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLAS's int8 activation codes and scales, per row and per block along the last axis.

    Args:
        x: ``(..., K)`` activations (computed in fp32, as the kernel reads them).
        block_size: the weight's MatMulNBits block size.

    Returns:
        ``codes (..., k_blocks, block_size)`` float32 integers in [-127, 127] (the last block zero-padded) and
        ``scales (..., k_blocks, 1)`` float32.
    """
    k = x.shape[-1]
    k_blocks = math.ceil(k / block_size)
    x = x.float()
    blocks = (x if k == k_blocks * block_size else F.pad(x, (0, k_blocks * block_size - k))).unflatten(
        -1, (k_blocks, block_size))
    return _block_codes(blocks)


def _block_codes(blocks: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of ``blocks (..., k_blocks, block)`` (fp32), the codes written into ``out`` if given."""
    amax = torch.linalg.vector_norm(blocks, ord=math.inf, dim=-1, keepdim=True)  # max |a|, one pass
    # correctly rounded fp32 divisions, as MLAS's scalar ``maxScalar / 127.f`` and ``127.f / maxScalar``: torch
    # computes ``scalar / tensor`` as ``scalar * reciprocal(tensor)``, one ulp off for some amax, which flips
    # codes that sit next to x.5
    code_max = torch.full_like(amax, ACTIVATION_CODE_MAX)
    inverse = torch.where(amax != 0, code_max / amax, torch.zeros_like(amax))
    return torch.mul(blocks, inverse, out=out).round_(), amax / code_max  # round: half to even, as _MM_ROUND_NEAREST


def _dequantized_codes(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``codes * scale`` of :func:`quantize_activations` as ``(..., K)`` fp32, written once into one buffer (the
    full blocks as a view of it, a partial last block as another), bit for bit the same numbers."""
    k = x.shape[-1]
    full = k // block_size * block_size
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start, stop, block in ((0, full, block_size), (full, k, k - full)):
        if stop == start:
            continue
        shape = ((stop - start) // block, block)
        codes, scales = _block_codes(x[..., start:stop].unflatten(-1, shape), out[..., start:stop].unflatten(-1, shape))
        codes.mul_(scales)
    return out


class _StraightThrough(torch.autograd.Function):
    """Forward: the int8 path's activations, bit for bit. Backward: the rounding's derivative taken as 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block_size: int, perm: torch.Tensor | None) -> torch.Tensor:
        quantized = _dequantized_codes((x if perm is None else x[..., perm]).float(), block_size)
        if perm is not None:
            quantized = torch.empty_like(quantized).index_copy_(-1, perm, quantized)
        return quantized.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


_CACHE = "_int8_activations"
"""Attribute of an input tensor holding its quantized form: siblings (q/k/v, gate/up) read one input and
quantize it once; the entry lives and dies with the tensor, and an in-place change (``_version``) voids it."""


def fake_quantize_activations(x: torch.Tensor, block_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as the int8 compute path sees it (``codes * scale``), with a straight-through gradient.

    Args:
        x: ``(..., K)`` activations of any float dtype.
        block_size: the weight's MatMulNBits block size (:func:`nbits_block_size`).
        perm: optional ``[K]`` input-channel order of the exported weight (GPTQ act-order: the graph gathers
            ``x[..., perm]`` before MatMulNBits, so its blocks run along that order).

    Returns:
        ``(..., K)`` in ``x``'s dtype; ``F.linear`` of it with the exact dequantized weight is the kernel's
        output up to fp32 summation order.
    """
    key = (x._version, block_size, None if perm is None else (perm.data_ptr(), perm._version),
           torch.is_grad_enabled(), x.requires_grad)
    cached = getattr(x, _CACHE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _StraightThrough.apply(x, block_size, perm)
    setattr(x, _CACHE, (key, result))
    return result


# --- 8-bit weights on the same grid (an adapter's down-projection factor, ``adapter.down_weights: int8``) ------


def fake_quantize_weights(w: torch.Tensor, block_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``w [N, K]`` as an 8-bit symmetric MatMulNBits stores it (``scale * code``), straight-through gradient.

    Each row's blocks take the activations' grid (:func:`quantize_activations`: ``scale = amax / 127``, codes
    rounded half to even in [-127, 127]), so the same function serves both and :func:`weight_codes` gives the
    integers an exporter writes for exactly these numbers. Rows are independent: a zero row (a masked triplet)
    stays zero, and slicing rows (compaction) leaves the others' codes unchanged.

    Args:
        w: ``[N, K]`` float weight (a LoRA down factor ``Λ * Q``).
        block_size: MatMulNBits block size (the base layer's, so both nodes read one set of activation codes).
        perm: optional ``[K]`` input-channel order of the exported node (blocks run along it).
    """
    return _StraightThrough.apply(w, block_size, perm)


@torch.no_grad()
def weight_codes(w: torch.Tensor, block_size: int, perm: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers of :func:`fake_quantize_weights`, in the exported channel order.

    Returns:
        ``q [N, K]`` int32 stored codes (``code + 128``, in [1, 255]) and ``scales [N, k_blocks]`` fp32:
        ``scales[n, k // block] * (q[n, k] - 128)`` is :func:`fake_quantize_weights`' value of ``w[n, perm[k]]``.
    """
    w = w.detach().float()
    if perm is not None:
        w = w[..., perm]
    codes, scales = quantize_activations(w, block_size)
    q = codes.flatten(-2)[..., :w.shape[-1]].to(torch.int32) + WEIGHT_ZERO_POINT
    return q, scales.squeeze(-1)
