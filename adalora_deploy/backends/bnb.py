"""bitsandbytes bases: ``Linear4bit`` (NF4/FP4, optional double quantization) and ``Linear8bitLt`` (LLM.int8).

The one place bitsandbytes layers are read (training, merging and export all come here). bitsandbytes
is imported only when a module from it is seen, so float-only users never load it.

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

from adalora_deploy.backends import LinearBackend, register_backend
from adalora_deploy.errors import require

__all__ = [
    "BNB_INV_127",
    "FP4_CODE",
    "NF4_CODE",
    "Bnb4bitBackend",
    "Bnb8bitBackend",
    "Linear4bitState",
    "dequantize_bnb4",
    "dequantize_int8",
    "linear4bit_state",
    "linear8bit_state",
    "pin_bnb4_arithmetic",
]

logger = logging.getLogger(__name__)

# bitsandbytes' 4-bit code books (bitsandbytes/functional.py get_4bit_type), index = 4-bit code.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)
FP4_CODE = torch.tensor(
    [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
     -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25],
    dtype=torch.float32,
)
BNB_INV_127 = 7.874015718698502e-3
"""bitsandbytes' int8_vectorwise_dequant constant (it multiplies by this instead of dividing by 127)."""


def _functional():
    return require("bitsandbytes.functional", "train", "reading bitsandbytes layers")


def _from_bnb(module: nn.Module, class_name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and any(
        cls.__name__ == class_name for cls in type(module).__mro__
    )


def dequantize_bnb4(packed: torch.Tensor, absmax: torch.Tensor, K: int, N: int, block_size: int,
                    quant_type: int) -> torch.Tensor:
    """bitsandbytes' 4-bit weight as fp32 ``[N, K]``: code book value times the fp32 absmax of its block.

    Args:
        packed: uint8 codes of the row-major ``[N, K]`` weight, first element of a byte in the high nibble.
        absmax: fp32 ``[ceil(N * K / block_size)]``.
        K, N, block_size: the layer's in/out features and bnb blocksize.
        quant_type: 1 = NF4, 0 = FP4 (MatMulBnb4's attribute).
    """
    flat = packed.reshape(-1).to(torch.int32)
    codes = torch.stack([(flat >> 4) & 0xF, flat & 0xF], dim=-1).reshape(-1)[: N * K]
    table = (NF4_CODE if quant_type == 1 else FP4_CODE).to(packed.device)
    values = table[codes.long()]
    scale = absmax.float().repeat_interleave(block_size)[: N * K]
    return (values * scale).reshape(N, K)


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 weight as fp32 ``[N, K]``: ``CB * SCB * (1/127)`` in bitsandbytes' own order of operations."""
    return cb.float() * scb.float().view(-1, 1) * BNB_INV_127


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

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[out, in]``."""
        return dequantize_bnb4(self.packed, self.absmax, self.in_features, self.out_features, self.block_size,
                               1 if self.quant_type == "nf4" else 0)


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
    n, k = state.shape
    if getattr(state, "packing_format_for_cpu", False):
        absmax = state.absmax.T.reshape(-1).float()  # the repack stored it [K / block, N] in bfloat16
        data, _ = functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
        logger.warning(
            "bitsandbytes already repacked this Linear4bit for its CPU kernel and rounded absmax to bfloat16; "
            "reading the rounded statistics (load the model again and read it before any eval forward for the "
            "exact fp32 absmax)"
        )
        exact = False
    else:
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


def pin_bnb4_arithmetic(model: nn.Module) -> None:
    """Make every bitsandbytes ``Linear4bit`` compute as in training (fp32 dequantize, then matmul).

    On CPUs with AVX512-BF16, bnb's first eval no-grad forward repacks the weight in place and rounds its
    absmax to bfloat16; training (and the exported MatMulBnb4) use the fp32 statistics.
    """
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class Bnb4bitBackend(LinearBackend):
    """``bnb.nn.Linear4bit``: weight packed two codes per byte, blockwise absmax in ``weight.quant_state``."""

    name = "bnb-4bit"

    def matches(self, module: nn.Module) -> bool:
        return _from_bnb(module, "Linear4bit")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return linear4bit_state(module).dequantize()

    def describe(self, module: nn.Module) -> str:
        state = module.weight.quant_state
        double = "-dq" if getattr(state, "nested", False) else ""
        return f"bnb-{state.quant_type}{double}"


class Bnb8bitBackend(LinearBackend):
    """``bnb.nn.Linear8bitLt``: int8 rows ``CB`` with per-row absmax ``SCB``: ``W = CB * SCB / 127``."""

    name = "bnb-int8"

    def matches(self, module: nn.Module) -> bool:
        return _from_bnb(module, "Linear8bitLt")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        if getattr(module.weight, "CB", None) is None and module.weight.data.dtype != torch.int8 \
                and getattr(module.state, "CB", None) is None:
            return module.weight.data.float()  # not yet quantized (still on its way to the device)
        cb, scb, _ = linear8bit_state(module)
        return dequantize_int8(cb, scb)


register_backend(Bnb4bitBackend())
register_backend(Bnb8bitBackend())
