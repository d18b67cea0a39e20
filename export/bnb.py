"""The one place the export package imports bitsandbytes: reading quantized Linear4bit state.

PITFALL (bitsandbytes 0.50 on CPUs with AVX512-BF16): the first eval, no-grad forward of a ``Linear4bit``
repacks its weight in place for bnb's CPU kernel (``quant_state.packing_format_for_cpu``), interleaving
the nibbles and rounding ``absmax`` to bfloat16 (double-quant statistics are dequantized first). The
codes can be unpacked back exactly; the fp32 absmax cannot. :func:`linear4bit_state` undoes the repack
on copies (never touching the layer) and reports ``exact=False`` in that case.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import contrib

__all__ = ["Linear4bitState", "dequantize_linear4bit", "linear4bit_state", "linear8bit_state"]

logger = logging.getLogger(__name__)


def _functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:  # pragma: no cover - bitsandbytes is a core dependency
        raise ImportError("reading bitsandbytes layers needs bitsandbytes: pip install bitsandbytes") from error
    return functional


@dataclass(frozen=True)
class Linear4bitState:
    """A ``Linear4bit``'s weight in bitsandbytes' standard layout (what MatMulBnb4 reads)."""

    packed: torch.Tensor
    """uint8 ``[(N * K + 1) // 2]``, row-major ``[N, K]`` codes, first element in the high nibble."""
    absmax: torch.Tensor
    """fp32 ``[ceil(N * K / block_size)]`` (double-quant statistics already dequantized)."""
    out_features: int
    in_features: int
    block_size: int
    quant_type: str
    """``"nf4"`` or ``"fp4"``."""
    exact: bool
    """False when bnb had already rounded absmax to bfloat16 for its CPU kernel (see module docstring)."""


def linear4bit_state(layer: nn.Module) -> Linear4bitState:
    """Read a quantized ``Linear4bit`` (nf4/fp4, with or without double quant) without modifying it.

    Raises:
        ValueError: the layer is not quantized yet.
    """
    functional = _functional()
    state = layer.weight.quant_state
    if state is None:
        raise ValueError("Linear4bit is not quantized yet (move it to a device first)")
    data = layer.weight.data
    if getattr(state, "packing_format_for_cpu", False):
        n, k = state.shape
        absmax = state.absmax.T.reshape(-1).float()  # the repack stored it [K / block, N] in bfloat16
        data, _ = functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
        logger.warning(
            "bitsandbytes already repacked this Linear4bit for its CPU kernel and rounded absmax to bfloat16; "
            "exporting with the rounded statistics (quantize/load again and export before any eval forward "
            "for exact fp32 absmax)"
        )
        exact = False
    else:
        n, k = state.shape
        if state.nested:
            absmax = (functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
        else:
            absmax = state.absmax.float()
        exact = True
    return Linear4bitState(
        packed=data.reshape(-1).view(torch.uint8).clone(), absmax=absmax.reshape(-1).contiguous(),
        out_features=int(n), in_features=int(k), block_size=int(state.blocksize),
        quant_type=str(state.quant_type), exact=exact,
    )


def dequantize_linear4bit(layer: nn.Module) -> torch.Tensor:
    """fp32 ``[out, in]`` weight of a quantized ``Linear4bit`` (codebook value times fp32 absmax)."""
    s = linear4bit_state(layer)
    return contrib.dequantize_bnb4(s.packed, s.absmax, s.in_features, s.out_features, s.block_size,
                                    1 if s.quant_type == "nf4" else 0)


def linear8bit_state(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(CB int8 [N, K], SCB fp32 [N], threshold)`` of a quantized ``Linear8bitLt``.

    bnb keeps CB/SCB on the weight until the first forward, then moves them to ``layer.state``.

    Raises:
        ValueError: the layer is not quantized yet.
    """
    cb = getattr(layer.weight, "CB", None)
    scb = getattr(layer.weight, "SCB", None)
    if cb is None or scb is None:
        cb, scb = layer.state.CB, layer.state.SCB
    if cb is None or scb is None:
        raise ValueError("Linear8bitLt is not quantized yet (load it with has_fp16_weights=False and move it to a device)")
    return cb, scb.float(), float(layer.state.threshold)
