"""GPTQ base layers: the checkpoint format, a pure-torch ``QuantLinear`` and its backend.

The format is the one transformers, gptqmodel and auto-gptq read and write (``docs/QUANT.md``). For a
Linear with weight ``(out, in)``, ``G = ceil(in / group_size)`` groups along ``in``::

    qweight  int32 (in * bits / 32, out)   quantized values, packed along in
    qzeros   int32 (G, out * bits / 32)    zero points, packed along out (v1: stored minus one)
    scales   fp16  (G, out)
    g_idx    int32 (in,)                   group of each input channel (non-monotone with desc_act)

    W[o, i] = scales[g, o] * (q[i, o] - z[g, o]),  g = g_idx[i]

Values are packed into 32-bit words as one little-endian bit stream: value ``j`` of a run of 32 values
occupies bits ``[j * bits, (j + 1) * bits)`` of the run's ``bits`` words. For 2/4/8 bits no value
straddles a word; for 3 bits values 10 and 21 do, which is exactly the layout of QUANT.md. Words are
signed int32 on disk, so unpacking shifts then masks.

``QuantLinear.forward`` dequantizes (``(q - z)`` then ``* s`` in fp16, bit-exact with gptqmodel's
TorchLinear) and calls ``F.linear``: gradients reach the input, the buffers stay frozen.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalora_deploy.artifacts import atomic_dir, copy_tokenizer_files, save_tensors, write_json
from adalora_deploy.backends import LinearBackend, register_backend

from adalora_deploy.errors import GPTQFormatError

__all__ = [
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "GPTQBackend",
    "GPTQFormatError",
    "GPTQQuantConfig",
    "QuantLinear",
    "default_g_idx",
    "load_gptq_model",
    "num_groups",
    "pack_columns",
    "pack_rows",
    "quant_linears",
    "read_quant_config",
    "save_gptq_model",
    "unpack_columns",
    "unpack_rows",
]

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
CheckpointFormat = Literal["gptq", "gptq_v2"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")
_WEIGHTS_NAME = "model.safetensors"
_INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------
# Packing primitives
# ---------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
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
    _check_bits(bits)
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
    _check_bits(bits)
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


# ---------------------------------------------------------------------------------------------------
# QuantLinear
# ---------------------------------------------------------------------------------------------------


def num_groups(in_features: int, group_size: int) -> int:
    """``G = ceil(in / group_size)``; 1 when ``group_size == -1``."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``g_idx[i] = i // group_size`` (all zeros for ``group_size == -1``), int32 ``(in,)``."""
    size = in_features if group_size == -1 else group_size
    return torch.div(torch.arange(in_features, device=device), size, rounding_mode="floor").to(torch.int32)


def _check_layout(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    _check_bits(bits)
    if group_size != -1 and group_size < 1:
        raise GPTQFormatError(f"group_size must be -1 or >= 1, got {group_size}")
    run = _values_per_run(bits)
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < 1 or size % run:
            raise GPTQFormatError(
                f"{bits}-bit GPTQ packing needs {name} to be a positive multiple of {run}, got {size}"
            )


class QuantLinear(nn.Module):
    """A frozen GPTQ-quantized linear layer, ``y = x @ dequant(qweight).T + bias``.

    Holds the checkpoint tensors as buffers (names exactly as in the checkpoint, which the ONNX
    exporter maps to MatMulNBits) and dequantizes on every forward, so the backward pass reaches
    ``x`` while nothing here has a gradient.

    Attributes:
        in_features: input width.
        out_features: output width.
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale/zero group; -1 means one group.
        sym: whether the quantizer was symmetric (zero fixed at ``2**(bits-1)``); informational.
        desc_act: whether the solver used act-order (``g_idx`` then non-monotone); informational.
        checkpoint_format: ``"gptq"`` (v1, zeros stored minus one) or ``"gptq_v2"`` (as is).
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        sym: bool = True,
        desc_act: bool = False,
        bias: bool = False,
        checkpoint_format: CheckpointFormat = "gptq",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_layout(in_features, out_features, bits, group_size)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.checkpoint_format: CheckpointFormat = checkpoint_format
        groups = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    @property
    def num_groups(self) -> int:
        """Number of scale/zero groups ``G``."""
        return self.scales.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
            f"checkpoint_format={self.checkpoint_format}, bias={self.bias is not None}"
        )

    # -- reading ------------------------------------------------------------------------------------

    def int_weight(self) -> torch.Tensor:
        """Quantized values ``q``, int32 ``(in, out)``."""
        return unpack_rows(self.qweight, self.bits)

    def zero_points(self) -> torch.Tensor:
        """Zero points as the dequantizer uses them (v1 already shifted back), int32 ``(G, out)``."""
        zeros = unpack_columns(self.qzeros, self.bits)
        if self.checkpoint_format == "gptq":
            zeros = (zeros + 1) & (2**self.bits - 1)
        return zeros

    def _contiguous_groups(self) -> bool:
        """Whether g_idx is the default ``i // group_size`` with equal groups (cached per g_idx version)."""
        key = (self.g_idx.data_ptr(), self.g_idx._version)
        if getattr(self, "_groups_key", None) != key:
            groups = self.num_groups
            self._groups_flag = self.in_features % groups == 0 and torch.equal(
                self.g_idx, default_g_idx(self.in_features, self.in_features // groups, self.g_idx.device))
            self._groups_key = key
        return self._groups_flag

    def _dequantize_exact(self) -> torch.Tensor:
        """``scales[g] * (q - z[g])`` in float32, ``(in, out)``: the exact product.

        An fp16 scale (11-bit significand) times an integer of at most 9 bits fits float32's 24-bit
        significand, so this is exact. Rounded to fp16 it is bit-identical to gptqmodel's and auto-gptq's
        fp16 dequantization (an IEEE multiply returns the rounded exact product); kept in float32 it is
        what onnxruntime's MatMulNBits computes, so fp32 training and the exported graph agree exactly.
        """
        q = self.int_weight()
        zeros = self.zero_points()
        scales = self.scales.float()
        if self._contiguous_groups():
            # Contiguous equal groups: broadcast per group instead of gathering (in, out) scales/zeros.
            # In-place steps: on CPU each fresh (in, out) buffer costs as much as the arithmetic.
            groups = self.num_groups
            q = q.view(groups, -1, self.out_features).sub_(zeros.unsqueeze(1))
            weight = q.to(torch.float32).mul_(scales.unsqueeze(1))
            return weight.view(self.in_features, self.out_features)
        g_idx = self.g_idx.long()
        return q.sub_(zeros[g_idx]).to(torch.float32).mul_(scales[g_idx])

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``(out, in)``: exact in float32; ``torch.float16`` gives gptqmodel's values."""
        return self._dequantize_exact().t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in)`` of any float dtype -> ``(..., out)`` of the same dtype (weight rounded once to it)."""
        weight = self._dequantize_exact().t().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    # -- writing ------------------------------------------------------------------------------------

    def to_checkpoint_format(self, checkpoint_format: CheckpointFormat) -> None:
        """Repack ``qzeros`` in place for ``"gptq"`` (v1) or ``"gptq_v2"``; values are unchanged.

        Raises:
            GPTQFormatError: converting to v1 while some zero point is 0 (v1 cannot store it).
        """
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        if checkpoint_format == self.checkpoint_format:
            return
        self.qzeros = _pack_zeros(self.zero_points(), self.bits, checkpoint_format)
        self.checkpoint_format = checkpoint_format

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        desc_act: bool = False,
        bias: torch.Tensor | None = None,
        checkpoint_format: CheckpointFormat = "gptq_v2",
    ) -> QuantLinear:
        """Pack already-quantized integers.

        Args:
            q: integer values ``(out, in)`` in ``[0, 2**bits)`` (the ``nn.Linear`` weight layout).
            scales: ``(G, out)``; stored as fp16.
            zeros: integer zero points ``(G, out)`` in ``[0, 2**bits)``.
            g_idx: group of each input channel ``(in,)``; None means ``i // group_size``.
            bits: 2, 3, 4 or 8.
            group_size: channels per group, or -1 for one group.
            sym: whether the quantizer was symmetric.
            desc_act: whether act-order was used.
            bias: optional ``(out,)``; stored as fp16 like GPTQ checkpoints do.
            checkpoint_format: ``"gptq_v2"`` (default, stores any zero) or ``"gptq"`` (v1).

        Raises:
            GPTQFormatError: on a shape/range mismatch, or a zero point of 0 with v1.
        """
        if q.dim() != 2:
            raise GPTQFormatError(f"q must be (out, in), got shape {tuple(q.shape)}")
        out_features, in_features = q.shape
        layer = cls(
            in_features,
            out_features,
            bits,
            group_size,
            sym=sym,
            desc_act=desc_act,
            bias=bias is not None,
            checkpoint_format=checkpoint_format,
            device=q.device,
        )
        groups = layer.num_groups
        if g_idx is None:
            g_idx = default_g_idx(in_features, group_size, q.device)
        if tuple(scales.shape) != (groups, out_features) or tuple(zeros.shape) != (groups, out_features):
            raise GPTQFormatError(
                f"scales and zeros must be ({groups}, {out_features}) for in={in_features}, group_size={group_size}; "
                f"got {tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        _check_g_idx(g_idx, in_features, groups, "g_idx")
        layer.qweight.copy_(pack_rows(q.t(), bits))
        layer.qzeros.copy_(_pack_zeros(zeros, bits, checkpoint_format))
        layer.scales.copy_(scales.to(torch.float16))
        layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(torch.float16))
        return layer

    @classmethod
    def from_float(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        desc_act: bool = False,
        bias: torch.Tensor | None = None,
        checkpoint_format: CheckpointFormat = "gptq_v2",
    ) -> QuantLinear:
        """Quantize a float weight with given scales/zeros, ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``.

        The fp16-rounded scales are used, as auto-gptq's and gptqmodel's packers do. Arguments as in
        :meth:`from_quantized`; ``linear_or_weight`` is an ``nn.Linear`` (its bias is taken unless
        ``bias`` is given) or a weight ``(out, in)``.
        """
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight.detach()
            if bias is None and linear_or_weight.bias is not None:
                bias = linear_or_weight.bias.detach()
        else:
            weight = linear_or_weight.detach()
        if weight.dim() != 2:
            raise GPTQFormatError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        in_features = weight.shape[1]
        if g_idx is None:
            g_idx = default_g_idx(in_features, group_size, weight.device)
        _check_g_idx(g_idx, in_features, scales.shape[0], "g_idx")
        g = g_idx.long()
        s = scales.to(torch.float16).float()[g].t()
        z = zeros.to(torch.float32)[g].t()
        q = torch.clamp(torch.round(weight.float() / s) + z, 0, 2**bits - 1).to(torch.int32)
        return cls.from_quantized(
            q,
            scales,
            zeros,
            g_idx,
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=desc_act,
            bias=bias,
            checkpoint_format=checkpoint_format,
        )


def _pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: CheckpointFormat) -> torch.Tensor:
    zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise GPTQFormatError(
                "checkpoint_format 'gptq' (v1) stores zero points minus one and cannot store a zero point of 0 "
                "(asymmetric quantization produces them); use checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return pack_columns(zeros, bits)


def _check_g_idx(g_idx: torch.Tensor, in_features: int, groups: int, where: str) -> None:
    if g_idx.dim() != 1 or g_idx.shape[0] != in_features or g_idx.dtype.is_floating_point:
        raise GPTQFormatError(
            f"{where} must be an integer vector of length {in_features}, got {tuple(g_idx.shape)} {g_idx.dtype}"
        )
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise GPTQFormatError(f"{where} values must lie in [0, {groups - 1}]")


# ---------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------


class GPTQBackend(LinearBackend):
    """Our pure-torch GPTQ :class:`QuantLinear`."""

    kind = "gptq"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, QuantLinear)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize_weight()

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None if module.bias is None else module.bias.detach().float()

    def describe(self, module: nn.Module) -> str:
        group = "all" if module.group_size == -1 else str(module.group_size)
        return f"gptq-{module.bits}bit-g{group}{'-asym' if not module.sym else ''}{'-act' if module.desc_act else ''}"


register_backend(GPTQBackend())


# ---------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQQuantConfig:
    """``config.json["quantization_config"]`` of a GPTQ checkpoint."""

    bits: int
    """2, 3, 4 or 8."""
    group_size: int
    """Input channels per group; -1 for one group per output row."""
    desc_act: bool
    """Act-order was used (``g_idx`` non-monotone)."""
    sym: bool
    """Symmetric quantization (zero fixed at ``2**(bits-1)``)."""
    checkpoint_format: CheckpointFormat = "gptq"
    """``"gptq"`` (v1, zeros stored minus one; the default when the key is missing) or ``"gptq_v2"``."""

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise GPTQFormatError(f"quantization_config.group_size must be -1 or >= 1, got {self.group_size}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(
                f"quantization_config.checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                f"got {self.checkpoint_format!r}"
            )

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization_config") -> GPTQQuantConfig:
        """Read the dict of a config.json; raises :class:`GPTQFormatError` naming ``where`` on bad entries."""
        if not isinstance(data, dict):
            raise GPTQFormatError(f"{where}: expected an object, got {type(data).__name__}")
        method = data.get("quant_method")
        if method != "gptq":
            raise GPTQFormatError(f"{where}: quant_method must be 'gptq', got {method!r}")
        pack_dtype = str(data.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise GPTQFormatError(f"{where}: pack_dtype {pack_dtype!r} is not supported (only int32 words)")
        try:
            return cls(
                bits=int(data["bits"]),
                group_size=int(data.get("group_size", -1)),
                desc_act=bool(data.get("desc_act", False)),
                sym=bool(data.get("sym", True)),
                # gptqmodel also spells the key "format"; absent means v1.
                checkpoint_format=data.get("checkpoint_format", data.get("format", "gptq")),
            )
        except KeyError as error:
            raise GPTQFormatError(f"{where}: missing key {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:  # includes GPTQFormatError from __post_init__
            raise GPTQFormatError(f"{where}: {error}") from None

    def to_dict(self) -> dict:
        """The ``quantization_config`` entry as transformers and gptqmodel read it."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "true_sequential": True,
            "static_groups": False,
        }


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every :class:`QuantLinear` in ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def _shared_config(layers: dict[str, QuantLinear], checkpoint_format: CheckpointFormat | None) -> GPTQQuantConfig:
    first_name, first = next(iter(layers.items()))
    for name, layer in layers.items():
        for attr in ("bits", "group_size", "sym", "desc_act"):
            if getattr(layer, attr) != getattr(first, attr):
                raise GPTQFormatError(
                    f"a GPTQ checkpoint has one {attr} for all layers: {first_name} has {getattr(first, attr)}, "
                    f"{name} has {getattr(layer, attr)}"
                )
    if checkpoint_format is None:
        checkpoint_format = "gptq" if first.sym else "gptq_v2"
    if checkpoint_format == "gptq" and not first.sym:
        raise GPTQFormatError(
            "asymmetric GPTQ checkpoints must be written as 'gptq_v2': v1 ('gptq') cannot store a zero point of 0"
        )
    return GPTQQuantConfig(first.bits, first.group_size, first.desc_act, first.sym, checkpoint_format)


def save_gptq_model(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer_source: str | Path | None = None,
    checkpoint_format: CheckpointFormat | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model holding :class:`QuantLinear` layers as a standard GPTQ Hugging Face folder.

    Writes ``config.json`` (the model config plus ``quantization_config``) and ``model.safetensors``
    (``<name>.qweight/.qzeros/.scales/.g_idx(/.bias)`` for quantized layers, float tensors for the
    rest), and copies tokenizer files from ``tokenizer_source``. Everything is written into a temporary
    folder next to ``folder`` and swapped into place whole (:func:`~adalora_deploy.artifacts.atomic_dir`),
    so no partial folder is left.

    Args:
        model: a transformers model (needs ``.config``) with at least one :class:`QuantLinear`.
        folder: destination.
        tokenizer_source: folder whose tokenizer/generation files are copied, or None.
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``; None picks v1 for symmetric and v2 for
            asymmetric quantization. v1 is refused for asymmetric layers.
        overwrite: replace an existing non-empty ``folder``.

    Returns:
        The folder.

    Raises:
        GPTQFormatError: no quantized layers, mixed settings, v1 with asymmetric layers, or an existing folder.
    """
    folder = Path(folder)
    layers = quant_linears(model)
    if not layers:
        raise GPTQFormatError("the model has no QuantLinear layers; quantize it first")
    if not hasattr(model, "config"):
        raise GPTQFormatError("save_gptq_model needs a transformers model (with .config)")
    quant_config = _shared_config(layers, checkpoint_format)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise GPTQFormatError(f"output folder {folder} exists and is not empty (pass overwrite=True to replace it)")

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen_storage:
            continue  # a tied weight (e.g. lm_head = embed_tokens): stored once, re-tied on load
        seen_storage[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    for name, layer in layers.items():
        zeros = layer.zero_points()
        tensors[f"{name}.qzeros"] = _pack_zeros(zeros, layer.bits, quant_config.checkpoint_format).cpu()

    config_dict = model.config.to_dict()
    config_dict["quantization_config"] = quant_config.to_dict()

    with atomic_dir(folder) as staging:
        save_tensors(staging / _WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(staging / "config.json", config_dict)
        if tokenizer_source is not None and not copy_tokenizer_files(tokenizer_source, staging):
            logger.warning("no tokenizer files found in %s", tokenizer_source)
    logger.info("wrote %d quantized layers (%s) to %s", len(layers), quant_config, folder)
    return folder


def read_quant_config(folder: str | Path) -> GPTQQuantConfig:
    """The ``quantization_config`` of a GPTQ folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise GPTQFormatError(f"{path}: not found (a GPTQ model folder needs config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GPTQFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise GPTQFormatError(f"{path}: no 'quantization_config' entry; this is not a GPTQ checkpoint")
    return GPTQQuantConfig.from_dict(config["quantization_config"], where=f"{path}: quantization_config")


class _TensorFiles:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint.

    Attributes:
        description: the file to name in errors about the checkpoint as a whole (single file or index).
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._handles = {}
        single, index = folder / _WEIGHTS_NAME, folder / _INDEX_NAME
        self.description = single if single.is_file() else index
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise GPTQFormatError(f"{index}: not a valid safetensors index ({error})") from None
            self._where = {key: folder / shard for key, shard in weight_map.items()}
            files = set(self._where.values())
        else:
            raise GPTQFormatError(f"{single}: not found (nor {_INDEX_NAME})")
        for path in sorted(files):
            if not path.is_file():
                raise GPTQFormatError(f"{path}: not found (listed in {_INDEX_NAME})")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own SafetensorError on bad headers
                raise GPTQFormatError(f"{path}: not a readable safetensors file ({error})") from None
            self._handles[path] = handle
            if single.is_file():
                self._where.update({key: path for key in handle.keys()})

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as error:
            raise GPTQFormatError(f"{path}: cannot read tensor {key!r} ({error})") from None

    def path(self, key: str) -> Path:
        return self._where[key]


def load_gptq_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a GPTQ Hugging Face folder (v1 or v2) into a transformers model with :class:`QuantLinear` layers.

    The model is built from config.json alone (no network); every ``nn.Linear`` whose ``<name>.qweight``
    is in the safetensors becomes a :class:`QuantLinear`; all tensors are read with safetensors (never
    pickle). Quantized buffers are loaded bit-exactly as stored; float tensors are cast to ``dtype``.

    Args:
        folder: the model folder (config.json, model.safetensors or a sharded index).
        dtype: dtype of the float (non-quantized) weights.
        device: where the model is placed.

    Returns:
        The model in eval mode with every parameter frozen.

    Raises:
        GPTQFormatError: a missing/unreadable file, a missing/unexpected key or a tensor of the wrong
            shape or dtype; the message names the file and key.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise GPTQFormatError(f"{folder}: not a folder")
    quant_config = read_quant_config(folder)
    files = _TensorFiles(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise GPTQFormatError(f"{folder / 'config.json'}: transformers cannot read it ({error})") from None
    # from_config would otherwise try to route GPTQ through optimum/gptqmodel.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    keys = files.keys()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in keys:
            layer = QuantLinear(
                module.in_features,
                module.out_features,
                quant_config.bits,
                quant_config.group_size,
                sym=quant_config.sym,
                desc_act=quant_config.desc_act,
                bias=module.bias is not None,
                checkpoint_format=quant_config.checkpoint_format,
            )
            model.set_submodule(name, layer)
    for key in keys:
        if key.endswith(".qweight") and not isinstance(_get_module(model, key.rsplit(".", 1)[0]), QuantLinear):
            raise GPTQFormatError(f"{files.path(key)}: {key} does not belong to an nn.Linear of this model")

    state = model.state_dict()
    groups: dict[tuple[int, int], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    quant_names = set(quant_linears(model))
    loaded: set[str] = set()
    for names in groups.values():
        present = [n for n in names if n in keys]
        if not present:
            owner, _, leaf = names[0].rpartition(".")
            if owner in quant_names and leaf == "g_idx":
                continue  # absent g_idx means i // group_size, which is the initial value
            raise GPTQFormatError(f"{files.description}: missing tensor {names[0]!r} (the model in config.json has it)")
        for name in present:
            _load_tensor(state[name], files, name, quant_names)
            loaded.add(name)
    unexpected = sorted(keys - set(state))
    if unexpected:
        raise GPTQFormatError(
            f"{files.path(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + " (the checkpoint does not match its config.json)"
        )
    for name in quant_names:
        layer = model.get_submodule(name)
        if f"{name}.g_idx" in loaded:
            _check_g_idx_loaded(layer, files.path(f"{name}.g_idx"), f"{name}.g_idx")
    model.to(device)
    model.requires_grad_(False)
    return model.eval()


def _get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


_QUANT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32}


def _load_tensor(target: torch.Tensor, files: _TensorFiles, key: str, quant_names: set[str]) -> None:
    source = files.get(key)
    path = files.path(key)
    if tuple(source.shape) != tuple(target.shape):
        raise GPTQFormatError(
            f"{path}: tensor {key!r} has shape {tuple(source.shape)}, "
            f"the model (from config.json) expects {tuple(target.shape)}"
        )
    owner, _, leaf = key.rpartition(".")
    if owner in quant_names and leaf in _QUANT_DTYPES:
        if source.dtype != torch.int32:
            raise GPTQFormatError(f"{path}: tensor {key!r} must be int32, got {source.dtype}")
    elif not source.dtype.is_floating_point and target.dtype.is_floating_point:
        raise GPTQFormatError(f"{path}: tensor {key!r} must be floating point, got {source.dtype}")
    with torch.no_grad():
        target.copy_(source.to(target.dtype))


def _check_g_idx_loaded(layer: QuantLinear, path: Path, key: str) -> None:
    g_idx = layer.g_idx
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= layer.num_groups):
        raise GPTQFormatError(f"{path}: tensor {key!r} has values outside [0, {layer.num_groups - 1}]")
