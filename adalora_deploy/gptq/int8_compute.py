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

__all__ = ["ACTIVATION_CODE_MAX", "MAX_BLOCK", "fake_quantize_activations", "nbits_block_size", "quantize_activations"]

ACTIVATION_CODE_MAX = 127.0
"""Largest int8 activation code: MLAS maps the block's largest magnitude to +-127 (never -128)."""
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
    blocks = F.pad(x.float(), (0, k_blocks * block_size - k)).unflatten(-1, (k_blocks, block_size))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scales = amax / ACTIVATION_CODE_MAX
    # a correctly rounded fp32 division, as MLAS's scalar ``127.f / maxScalar``: torch computes ``scalar / tensor``
    # as ``scalar * reciprocal(tensor)``, one ulp off at times, which flips codes that sit near .5
    inverse = torch.where(amax != 0, torch.full_like(amax, ACTIVATION_CODE_MAX) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inverse), scales  # torch.round: half to even, as _MM_ROUND_NEAREST


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
    source = x if perm is None else x[..., perm]
    codes, scales = quantize_activations(source.detach(), block_size)
    quantized = (codes * scales).flatten(-2)[..., : x.shape[-1]]
    if perm is not None:
        quantized = torch.empty_like(quantized).index_copy_(-1, perm, quantized)
    # straight through: forward the codes' values bit for bit (``x - x.detach()`` is exactly zero; the usual
    # ``x + (q - x).detach()`` rounds twice and can miss q by an ulp), gradient 1 into x
    return quantized.to(x.dtype) + (x - x.detach())
