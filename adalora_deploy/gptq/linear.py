"""The GPTQ base layer: a pure-torch ``QuantLinear`` over the checkpoint tensors.

The checkpoint layout (packing, groups, zero points) is :mod:`adalora_deploy.gptq.packing`; reading and
writing whole checkpoint folders is :mod:`adalora_deploy.gptq.checkpoint`. The adapter reads this layer
through :class:`adalora_deploy.backends.gptq.GPTQBackend`, like every other base kind.

``QuantLinear.forward`` dequantizes to the exact fp32 product ``s * (q - z)`` (rounded once to the
activation dtype; in fp16 that is bit-exact with gptqmodel's TorchLinear) and calls ``F.linear``:
gradients reach the input, the buffers stay frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adalora_deploy.errors import GPTQFormatError
from adalora_deploy.gptq.int8_compute import fake_quantize_activations, nbits_block_size
from adalora_deploy.gptq.packing import (
    CHECKPOINT_FORMATS,
    CheckpointFormat,
    check_g_idx,
    check_layout,
    default_g_idx,
    num_groups,
    pack_rows,
    pack_zeros,
    unpack_rows,
    unpack_zeros,
)

__all__ = ["QuantLinear", "quant_linears"]


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
        check_layout(in_features, out_features, bits, group_size)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.activation_block: int | None = None
        """Block length of int8 activations (:meth:`use_int8_activations`); None: fp32 activations."""
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
        return unpack_zeros(self.qzeros, self.bits, self.checkpoint_format)

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

    def use_int8_activations(self, enabled: bool = True) -> None:
        """Compute as onnxruntime's MatMulNBits does at accuracy_level 4 (int8 activation blocks of the
        exported block size, in the exported channel order; see :mod:`adalora_deploy.gptq.int8_compute`),
        or again with fp32 activations."""
        self.activation_block = nbits_block_size(self.group_size, self.in_features) if enabled else None

    def activation_order(self) -> torch.Tensor | None:
        """The exported input-channel order (act-order weights are sorted by group), or None when natural.

        Cached per g_idx version like :meth:`_contiguous_groups`: the forward asks on every call, and a natural
        order (also with a partial last group, e.g. K = 576 in groups of 128) needs no gather at all."""
        key = (self.g_idx.data_ptr(), self.g_idx._version)
        if getattr(self, "_order_key", None) != key:
            order = torch.argsort(self.g_idx, stable=True)
            natural = torch.equal(order, torch.arange(self.in_features, device=order.device))
            self._order, self._order_key = None if natural else order, key
        return self._order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in)`` of any float dtype -> ``(..., out)`` of the same dtype (weight rounded once to it)."""
        if self.activation_block is not None:
            x = fake_quantize_activations(x, self.activation_block, self.activation_order())
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
        self.qzeros = pack_zeros(self.zero_points(), self.bits, checkpoint_format)
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
        check_g_idx(g_idx, in_features, groups, "g_idx")
        layer.qweight.copy_(pack_rows(q.t(), bits))
        layer.qzeros.copy_(pack_zeros(zeros, bits, checkpoint_format))
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
        check_g_idx(g_idx, in_features, scales.shape[0], "g_idx")
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


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every :class:`QuantLinear` in ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
