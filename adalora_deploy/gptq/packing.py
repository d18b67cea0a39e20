"""The GPTQ checkpoint layout: bit packing, groups and zero points (the one place they are written).

For a Linear with weight ``(out, in)``, ``G = ceil(in / group_size)`` groups along ``in`` (docs/QUANT.md)::

    qweight  int32 (in * bits / 32, out)   quantized values, packed along in
    qzeros   int32 (G, out * bits / 32)    zero points, packed along out (v1: stored minus one)
    scales   fp16  (G, out)
    g_idx    int32 (in,)                   group of each input channel (non-monotone with desc_act)

    W[o, i] = scales[g, o] * (q[i, o] - z[g, o]),  g = g_idx[i]

Values are packed into 32-bit words as one little-endian bit stream: value ``j`` of a run of 32 values
occupies bits ``[j * bits, (j + 1) * bits)`` of the run's ``bits`` words. For 2/4/8 bits no value
straddles a word; for 3 bits values 10 and 21 do, which is exactly the layout of docs/QUANT.md. Words are
signed int32 on disk, so unpacking shifts then masks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from adalora_deploy.errors import GPTQFormatError
from adalora_deploy.gptq import SUPPORTED_BITS

__all__ = [
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "CheckpointFormat",
    "check_bits",
    "check_g_idx",
    "check_layout",
    "default_g_idx",
    "num_groups",
    "pack_columns",
    "pack_rows",
    "pack_zeros",
    "unpack_columns",
    "unpack_rows",
    "unpack_zeros",
]

CheckpointFormat = Literal["gptq", "gptq_v2"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------------------------------
# Packing primitives
# ---------------------------------------------------------------------------------------------------


def check_bits(bits: int) -> None:
    """Raise :class:`GPTQFormatError` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if bits not in SUPPORTED_BITS:
        raise GPTQFormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _values_per_run(bits: int) -> int:
    """Smallest number of values that fills whole int32 words (8 for 4 bits, 32 for 3 bits)."""
    return 32 // math.gcd(32, bits)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` -> the int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 0 into int32 words (the ``qweight`` layout).

    Args:
        values: integer tensor ``(n, m)`` with entries in ``[0, 2**bits)``; ``n`` a multiple of
            ``32 / gcd(32, bits)`` (8 for 4 bits, 32 for 3 bits).
        bits: 2, 3, 4 or 8.

    Returns:
        int32 ``(n * bits / 32, m)``.
    """
    check_bits(bits)
    if values.dim() != 2 or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise GPTQFormatError(f"pack_rows expects a 2-D integer tensor, got {tuple(values.shape)} {values.dtype}")
    n, m = values.shape
    run = _values_per_run(bits)
    if n % run:
        raise GPTQFormatError(f"{bits}-bit packing needs a multiple of {run} rows, got {n}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise GPTQFormatError(f"values to pack must lie in [0, {2**bits - 1}] for {bits} bits")
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = (torch.arange(per_word, device=v.device, dtype=torch.int64) * bits).view(1, per_word, 1)
        # Fields never overlap, so the sum is the bitwise OR; int64 holds the full unsigned word.
        words = (v.view(n // per_word, per_word, m) << shifts).sum(dim=1)
    else:
        v = v.view(n // 32, 32, m)
        words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=v.device)
        for j in range(32):
            word, shift = divmod(j * bits, 32)
            words[:, word] |= (v[:, j] << shift) & 0xFFFFFFFF
            if shift + bits > 32:
                words[:, word + 1] |= v[:, j] >> (32 - shift)
        words = words.view(n // 32 * bits, m)
    return _to_int32(words)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``(k, m)`` -> int32 ``(k * 32 / bits, m)`` in ``[0, 2**bits)``."""
    check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise GPTQFormatError(f"unpack_rows expects a 2-D int32 tensor, got {tuple(packed.shape)} {packed.dtype}")
    k, m = packed.shape
    mask = 2**bits - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = (torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits).view(1, per_word, 1)
        # Arithmetic shift copies the sign bit downwards; the mask drops those copies.
        return (packed.unsqueeze(1) >> shifts).bitwise_and_(mask).reshape(k * per_word, m)
    if k % bits:
        raise GPTQFormatError(f"{bits}-bit unpacking needs a multiple of {bits} words, got {k}")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(k // bits, bits, m)
    out = torch.empty(k // bits, 32, m, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        low_bits = min(bits, 32 - shift)
        value = (words[:, word] >> shift) & (2**low_bits - 1)
        if low_bits < bits:
            value |= (words[:, word + 1] << low_bits) & mask
        out[:, j] = value
    return out.view(k // bits * 32, m).to(torch.int32)


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 1 (the ``qzeros`` layout): ``(g, m)`` -> int32 ``(g, m * bits / 32)``."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 ``(g, k)`` -> int32 ``(g, k * 32 / bits)``."""
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()



def num_groups(in_features: int, group_size: int) -> int:
    """``G = ceil(in / group_size)``; 1 when ``group_size == -1``."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``g_idx[i] = i // group_size`` (all zeros for ``group_size == -1``), int32 ``(in,)``."""
    size = in_features if group_size == -1 else group_size
    return torch.div(torch.arange(in_features, device=device), size, rounding_mode="floor").to(torch.int32)


def check_layout(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    check_bits(bits)
    if group_size != -1 and group_size < 1:
        raise GPTQFormatError(f"group_size must be -1 or >= 1, got {group_size}")
    run = _values_per_run(bits)
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < 1 or size % run:
            raise GPTQFormatError(
                f"{bits}-bit GPTQ packing needs {name} to be a positive multiple of {run}, got {size}"
            )


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: CheckpointFormat) -> torch.Tensor:
    """Zero points ``(G, out)`` as stored in ``qzeros``: v1 (``"gptq"``) stores ``z - 1``, v2 stores ``z``."""
    zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise GPTQFormatError(
                "checkpoint_format 'gptq' (v1) stores zero points minus one and cannot store a zero point of 0 "
                "(asymmetric quantization produces them); use checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return pack_columns(zeros, bits)


def check_g_idx(g_idx: torch.Tensor, in_features: int, groups: int, where: str) -> None:
    if g_idx.dim() != 1 or g_idx.shape[0] != in_features or g_idx.dtype.is_floating_point:
        raise GPTQFormatError(
            f"{where} must be an integer vector of length {in_features}, got {tuple(g_idx.shape)} {g_idx.dtype}"
        )
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise GPTQFormatError(f"{where} values must lie in [0, {groups - 1}]")


def unpack_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: CheckpointFormat) -> torch.Tensor:
    """Zero points ``(G, out)`` as the dequantizer uses them, from ``qzeros``.

    v1 (``"gptq"``) stores ``z - 1`` and reads back ``(stored + 1) & (2**bits - 1)``, as gptqmodel and
    auto-gptq do; v2 stores ``z`` as is.
    """
    zeros = unpack_columns(qzeros, bits)
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    return zeros
