"""Export-friendly modules every base kind shares: the LoRA branch and the MatMulNBits twin.

Each module is a few buffers plus one line of math whose torch forward reproduces the arithmetic of the
ONNX node(s) it exports to, so a torch model built from them is the reference for the exported graph:

- :class:`LowRankBranch`: ``base(x) + (x @ A.T) @ B.T``, two MatMuls beside the base; factors are
  initializers, or graph inputs with a symbolic rank axis (switchable adapters). :func:`joint_factors` packs
  the branches of siblings that read one input (q/k/v, gate/up) as one branch of the concatenated output.
- :class:`NBitsLinear`: onnxruntime ``com.microsoft.MatMulNBits`` (2/4/8-bit blockwise weights), the op
  several kinds share: built from GPTQ tensors, a float weight (round-to-nearest: merged int4/int8 and the
  fast path's quantized tables), or a bitsandbytes Linear8bitLt / Linear4bit (the bnb serving twins).

A base kind's own twin (``Bnb4Linear``, ``Int8EmulationLinear``) lives in its file under
:mod:`adalora_deploy.export.build.kinds`, with its op. Swap modules in with :func:`swap_module`;
:func:`runtime_factors` feeds adapter-inputs branches in torch.

A twin describes its node once, in ``lowering()`` (a ``contrib.ContribNode`` or ``contrib.PatternNode``): its
forward calls the custom op through it and the fast path emits it, so both builders write the same node;
``can_fuse_with(others)`` says whether siblings reading the same input concatenate along N into one node.
Export with ``custom_translation_table=export.build.contrib.CUSTOM_TRANSLATION_TABLE`` (``export.build.graph`` does).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from adalora_deploy.adapters import replace_module as swap_module
from adalora_deploy.backends.bnb import linear4bit_state, linear8bit_state
from adalora_deploy.errors import ConfigError
from adalora_deploy.gptq.int8_compute import nbits_block_size
from adalora_deploy.gptq.packing import unpack_rows, unpack_zeros
from adalora_deploy.gptq.solver import rtn_blocks

from . import contrib  # the custom ops, their schemas and the lowering descriptions

__all__ = ["LowRankBranch", "NBitsLinear", "default_zero_points", "joint_factors", "runtime_factors", "swap_module"]

logger = logging.getLogger(__name__)

_NBITS_CPU_BITS = (2, 4, 8)
"""Bit widths onnxruntime's CPU MatMulNBits kernel implements."""


class LowRankBranch(nn.Module):
    """A base linear plus a low-rank branch: ``y = base(x) + (x @ A.T) @ B.T``.

    ``A`` [r, in] and ``B`` [out, r] carry all scaling (AdaLoRA's ``E * Λ`` and ``alpha / r`` folded in).
    They are stored transposed (``A.T`` [in, r], ``B.T`` [r, out]) so the graph holds exactly two MatMuls.

    In adapter-inputs mode (``factors_as_inputs=True``) the module holds no factors: the export wrapper sets
    them per call with :meth:`set_factors` from graph inputs named ``<module>.lora_A`` ([in, rank]) and
    ``<module>.lora_B`` ([rank, out]), with a symbolic ``rank`` axis, so one graph serves any adapter.

    ::

        x ──> base ───────────────────────────> Add ──> y
        └───> MatMul(lora_A [in,r]) ─> MatMul(lora_B [r,out]) ─┘
    """

    def __init__(
        self,
        base: nn.Module,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        *,
        factors_as_inputs: bool = False,
        in_features: int | None = None,
        out_features: int | None = None,
        down: NBitsLinear | None = None,
    ) -> None:
        """Args:
        base: the frozen base layer (``nn.Linear``, :class:`NBitsLinear`, a kind's twin, ...).
        A: ``[r, in]`` down factor (required unless ``factors_as_inputs``).
        B: ``[out, r]`` up factor (required unless ``factors_as_inputs``).
        factors_as_inputs: take the factors from :meth:`set_factors` at call time instead.
        in_features, out_features: sizes when ``base`` does not expose them.
        down: the down product as an 8-bit :class:`NBitsLinear` (``A`` quantized, an adapter trained with
            ``down_weights: int8``): it computes ``x @ A.T`` in the graph, ``A`` stays for reference.
        """
        super().__init__()
        self.base = base
        self.down = down
        self.in_features = int(in_features if in_features is not None else base.in_features)
        self.out_features = int(out_features if out_features is not None else base.out_features)
        self.factors_as_inputs = factors_as_inputs
        self._runtime_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        if factors_as_inputs:
            if A is not None or B is not None:
                raise ValueError("LowRankBranch: pass either A and B, or factors_as_inputs=True, not both")
            return
        if A is None or B is None:
            raise ValueError("LowRankBranch: A and B are required unless factors_as_inputs=True")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LowRankBranch: expected A [r, in] and B [out, r], got {tuple(A.shape)} and {tuple(B.shape)}")
        if down is not None and (down.in_features, down.out_features) != (A.shape[1], A.shape[0]):
            raise ValueError(f"LowRankBranch: down product [{down.out_features}, {down.in_features}] does not fit A "
                             f"{tuple(A.shape)}")
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"LowRankBranch: factors {tuple(A.shape)} / {tuple(B.shape)} do not fit base "
                f"[{self.out_features}, {self.in_features}]"
            )
        self.register_buffer("lora_A", A.detach().float().T.contiguous())  # [in, r]
        self.register_buffer("lora_B", B.detach().float().T.contiguous())  # [r, out]

    @property
    def rank(self) -> int | None:
        """The stored rank, or ``None`` in adapter-inputs mode."""
        return None if self.factors_as_inputs else int(self.lora_A.shape[1])

    def set_factors(self, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> None:
        """Adapter-inputs mode: use ``lora_A`` [in, r] and ``lora_B`` [r, out] until cleared with ``None``."""
        if not self.factors_as_inputs:
            raise ValueError("LowRankBranch.set_factors needs factors_as_inputs=True")
        self._runtime_factors = None if lora_A is None else (lora_A, lora_B)

    # x ──> base ──────────────────────────────────────> Add ──> y
    # └───> MatMul(lora_A [in, r]) ──> MatMul(lora_B [r, out]) ──┘
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factors_as_inputs:
            if self._runtime_factors is None:
                raise RuntimeError("LowRankBranch in adapter-inputs mode called without set_factors()")
            a, b = self._runtime_factors
        else:
            a, b = self.lora_A, self.lora_B
        down = self.down(x) if self.down is not None else torch.matmul(x, a.to(x.dtype))
        return self.base(x) + torch.matmul(down, b.to(x.dtype))


def joint_factors(members: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA branches of siblings that read one input as one branch of their concatenated output.

    ``lora_A`` concatenates the members' ``lora_A`` along the rank; ``lora_B`` holds their ``lora_B`` on its
    diagonal blocks and zeros elsewhere, so member i's output columns are ``(x @ A_i) @ B_i`` plus exact zeros
    (up to summation order, the members' own branches)::

        lora_A = [A_1 | A_2 | ...]          [in, sum r_i]
        lora_B = diag(B_1, B_2, ...)        [sum r_i, sum out_i]

    A member that is no :class:`LowRankBranch` (its adapter compacted to rank 0, or none) counts as rank 0: its
    output columns of ``lora_B`` are zero.

    Args:
        members: the siblings in output order, each a :class:`LowRankBranch` holding its factors or a base
            linear exposing ``in_features`` / ``out_features``.

    Returns:
        ``(lora_A [in, sum r_i], lora_B [sum r_i, sum out_i])``, fp32.

    Raises:
        ValueError: a member in adapter-inputs mode, or members of different input widths.
    """
    if any(isinstance(m, LowRankBranch) and m.factors_as_inputs for m in members):
        raise ValueError("joint_factors: adapter-inputs branches hold no factors to pack")
    widths = {int(m.in_features) for m in members}
    if len(widths) != 1:
        raise ValueError(f"joint_factors: members read inputs of different widths {sorted(widths)}")
    (width,) = widths
    downs, ups = [], []
    for m in members:
        if isinstance(m, LowRankBranch):
            downs.append(m.lora_A)
            ups.append(m.lora_B)
        else:
            downs.append(torch.zeros(width, 0))
            ups.append(torch.zeros(0, int(m.out_features)))
    return torch.cat(downs, dim=1), torch.block_diag(*ups)


@contextlib.contextmanager
def runtime_factors(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each adapter-inputs :class:`LowRankBranch` ``name`` computes with ``factors[name]``.

    Args:
        model: a model holding adapter-inputs branches.
        factors: module name -> ``(A [r, in], B [out, r])`` in the PEFT orientation (scaling folded in);
            every adapter-inputs branch must be present (use rank-0 factors to switch one off).
    """
    branches = {name: m for name, m in model.named_modules() if isinstance(m, LowRankBranch) and m.factors_as_inputs}
    missing = sorted(set(branches) - set(factors))
    unknown = sorted(set(factors) - set(branches))
    if missing or unknown:
        raise ValueError(f"runtime_factors: missing factors for {missing}; no adapter-inputs branch named {unknown}")
    try:
        for name, branch in branches.items():
            A, B = factors[name]
            branch.set_factors(A.float().T, B.float().T)
        yield
    finally:
        for branch in branches.values():
            branch.set_factors(None, None)


def _pack_along_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values in [0, 2**bits) into uint8, ``8 // bits`` per byte, low bits first (pads with 0)."""
    per_byte = 8 // bits
    pad = (-values.shape[-1]) % per_byte
    values = values.to(torch.uint8)
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    if per_byte == 1:
        return values.contiguous()
    if per_byte == 2:  # two nibbles as one little-endian int16 (lo + 256 hi): lo | hi << 4 in two passes
        pairs = values.contiguous().view(torch.int16)
        return (pairs | (pairs >> 4)).to(torch.uint8)
    values = values.reshape(*values.shape[:-1], -1, per_byte)
    packed = values[..., 0].clone()
    for i in range(1, per_byte):
        packed |= values[..., i] << (i * bits)
    return packed


_RTN_ROWS = 4096
"""Rows quantized at a time by :meth:`NBitsLinear.from_float`: bounds its temporaries (an embedding table of
49152 x 576 would otherwise need several fp32 copies of itself)."""


def default_zero_points(out_features: int, k_blocks: int, bits: int) -> torch.Tensor:
    """MatMulNBits' zero points when the input is left out: ``2**(bits-1)`` per block, packed
    ``8 // bits`` to a byte (low bits first; the last byte's unused slots are 0). uint8 ``[N, ceil(k_blocks * bits / 8)]``."""
    per_byte = 8 // bits
    full, rest = divmod(k_blocks, per_byte)
    value = lambda count: sum((1 << (bits - 1)) << (i * bits) for i in range(count))  # noqa: E731
    row = [value(per_byte)] * full + ([value(rest)] if rest else [])
    return torch.tensor(row, dtype=torch.uint8).expand(out_features, len(row)).contiguous()


class NBitsLinear(nn.Module):
    """``y = x @ W.T + bias`` with W stored as onnxruntime MatMulNBits blocks; exports to one MatMulNBits.

    ``W[n, k] = scales[n, k // block] * (q[n, k] - zero[n, k // block])``, q and zero unsigned ``bits``-bit
    integers. The torch forward dequantizes in fp32 and equals onnxruntime at ``accuracy_level`` 0 (fp32
    compute) up to summation order; ``accuracy_level`` 4 quantizes activations to int8 per block in
    onnxruntime (fast, lossy: judge with the lossy parity tier).

    If the input channels were permuted (GPTQ act-order), ``perm`` gathers the activations first::

        x ──> Gather(perm, axis=-1) ──> MatMulNBits(q, scales, zeros) ──> Add(bias) ──> y
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor,
        *,
        in_features: int,
        out_features: int,
        bits: int,
        block_size: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        accuracy_level: int = 0,
    ) -> None:
        """Args:
        qweight: uint8 ``[N, k_blocks, block_size * bits / 8]``.
        scales: fp32 ``[N, k_blocks]``.
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]``.
        in_features, out_features: K and N.
        bits: 2, 4 or 8.
        block_size: power of two >= 16.
        bias: optional ``[N]``.
        perm: optional int64 ``[K]``: the layer computes ``x[..., perm] @ W.T``.
        accuracy_level: MatMulNBits ``accuracy_level`` (0 exact fp32, 4 int8 activations).
        """
        super().__init__()
        if bits not in _NBITS_CPU_BITS:
            raise ValueError(f"NBitsLinear: bits={bits} is not supported by onnxruntime MatMulNBits (use 2, 4 or 8)")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"NBitsLinear: block_size={block_size} must be a power of two >= 16")
        k_blocks = math.ceil(in_features / block_size)
        expected = (out_features, k_blocks, block_size * bits // 8)
        if tuple(qweight.shape) != expected or qweight.dtype != torch.uint8:
            raise ValueError(f"NBitsLinear: qweight must be uint8 {expected}, got {qweight.dtype} {tuple(qweight.shape)}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zero_points", zero_points.to(torch.uint8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64).contiguous())

    # --- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_integers(
        cls,
        q: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        *,
        bits: int,
        block_size: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        accuracy_level: int = 0,
    ) -> NBitsLinear:
        """Build from unpacked integers.

        Args:
            q: ``[N, K]`` integer codes in [0, 2**bits).
            zeros: ``[N, k_blocks]`` integer zero points in [0, 2**bits).
            scales: ``[N, k_blocks]`` float scales.
            bits, block_size, bias, perm, accuracy_level: as in the constructor.
        """
        n, k = q.shape
        k_blocks = math.ceil(k / block_size)
        if tuple(zeros.shape) != (n, k_blocks) or tuple(scales.shape) != (n, k_blocks):
            raise ValueError(f"NBitsLinear.from_integers: zeros/scales must be [{n}, {k_blocks}]")
        padded = torch.nn.functional.pad(q.to(torch.int32), (0, k_blocks * block_size - k))
        packed = _pack_along_last(padded.reshape(n, k_blocks, block_size), bits)
        zp = _pack_along_last(zeros.to(torch.int32), bits)
        return cls(packed, scales, zp, in_features=k, out_features=n, bits=bits, block_size=block_size,
                   bias=bias, perm=perm, accuracy_level=accuracy_level)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int = 4,
        block_size: int = 32,
        accuracy_level: int = 0,
        symmetric: bool = False,
    ) -> NBitsLinear:
        """Round-to-nearest quantization of a float ``[N, K]`` weight, one grid per block of K.

        The grid is :func:`adalora_deploy.gptq.solver.rtn_blocks`' (fp32 scales, as MatMulNBits stores them):
        asymmetric by default, or with ``symmetric`` onnxruntime's symmetric int4 grid, whose zero points all
        equal MatMulNBits' default so an exporter can leave them out (fewer bytes per decoded token).
        Rows are quantized in chunks of :data:`_RTN_ROWS` to bound the temporaries.
        """
        w = weight.detach()
        n, k = w.shape
        k_blocks = math.ceil(k / block_size)
        qweight = torch.empty((n, k_blocks, block_size * bits // 8), dtype=torch.uint8)
        scales = torch.empty((n, k_blocks), dtype=torch.float32)
        zero_points = torch.empty((n, math.ceil(k_blocks * bits / 8)), dtype=torch.uint8)
        for start in range(0, n, _RTN_ROWS):
            rows = w[start:start + _RTN_ROWS].float().cpu().numpy()
            q, scale, zeros = rtn_blocks(rows, bits, block_size, "sym-onnx" if symmetric else "asym")
            stop = start + rows.shape[0]
            qweight[start:stop] = _pack_along_last(torch.from_numpy(q), bits)
            scales[start:stop] = torch.from_numpy(scale)
            zero_points[start:stop] = _pack_along_last(torch.from_numpy(zeros), bits)
        return cls(qweight, scales, zero_points, in_features=k, out_features=n, bits=bits, block_size=block_size,
                   bias=bias, accuracy_level=accuracy_level)

    @classmethod
    def from_quantized(cls, quantized: Any, *, bias: torch.Tensor | None = None, accuracy_level: int = 0) -> NBitsLinear:
        """Pack a :class:`~adalora_deploy.gptq.solver.QuantizedWeight` (RTN or GPTQ solver output) exactly.

        Args:
            quantized: integers ``q (out, in)``, ``scales``/``zeros (G, out)``, ``g_idx (in,)``, bits, group_size.
            bias: optional ``[N]``.
            accuracy_level: MatMulNBits ``accuracy_level``.
        """
        return cls._from_groups(quantized.q.T, quantized.zeros, quantized.scales, quantized.g_idx,
                                bits=quantized.bits, group_size=quantized.group_size, bias=bias,
                                accuracy_level=accuracy_level)

    @classmethod
    def from_gptq(cls, layer: Any, *, accuracy_level: int = 0) -> NBitsLinear:
        """Repack a GPTQ ``QuantLinear`` (buffers qweight/qzeros/scales/g_idx, attributes bits/group_size/
        checkpoint_format) exactly; see :meth:`from_gptq_tensors`."""
        return cls.from_gptq_tensors(
            layer.qweight, layer.qzeros, layer.scales, getattr(layer, "g_idx", None),
            bits=int(layer.bits), group_size=int(layer.group_size), in_features=int(layer.in_features),
            out_features=int(layer.out_features), checkpoint_format=str(getattr(layer, "checkpoint_format", "gptq")),
            bias=getattr(layer, "bias", None), accuracy_level=accuracy_level,
        )

    @classmethod
    def from_gptq_tensors(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        checkpoint_format: str = "gptq",
        bias: torch.Tensor | None = None,
        accuracy_level: int = 0,
    ) -> NBitsLinear:
        """Repack GPTQ tensors into MatMulNBits blocks, exactly (the fp16 scales widen to fp32 losslessly).

        Act-order (``g_idx`` not equal to ``i // group_size``) is handled by sorting the input channels by
        group offline and gathering the activations with the same permutation, never by passing ``g_idx``
        to MatMulNBits: onnxruntime's CPU kernel ignores uint8 zero points when ``g_idx`` is given.

        Args:
            qweight: int32 ``[K * bits / 32, N]`` packed along K, least significant first.
            qzeros: int32 ``[G, N * bits / 32]`` packed along N; v1 (``"gptq"``) stores ``zero - 1``.
            scales: ``[G, N]``.
            g_idx: int32 ``[K]`` group of each input channel, or ``None`` for ``i // group_size``.
            bits: 2, 4 or 8 (3-bit GPTQ has no MatMulNBits kernel).
            group_size: the checkpoint's group size, -1 for one group.
            in_features, out_features: K and N.
            checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``.
            bias: optional ``[N]``.
            accuracy_level: MatMulNBits ``accuracy_level``.
        """
        if bits not in _NBITS_CPU_BITS:
            raise ValueError(f"NBitsLinear.from_gptq: {bits}-bit GPTQ has no onnxruntime MatMulNBits kernel (2/4/8 only)")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"NBitsLinear.from_gptq: checkpoint_format {checkpoint_format!r} is not 'gptq' or 'gptq_v2'")
        q = unpack_rows(qweight.to(torch.int32), bits)[:in_features]  # [K, N]
        z = unpack_zeros(qzeros.to(torch.int32), bits, checkpoint_format)[:, :out_features]  # [G, N]
        return cls._from_groups(q, z, scales, g_idx, bits=bits, group_size=group_size, bias=bias,
                                accuracy_level=accuracy_level)

    @classmethod
    def _from_groups(
        cls,
        q: torch.Tensor,
        z: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None,
        accuracy_level: int,
    ) -> NBitsLinear:
        """MatMulNBits blocks from group-wise integers ``q [K, N]``, zeros/scales ``[G, N]`` and ``g_idx [K]``."""
        if bits not in _NBITS_CPU_BITS:
            raise ValueError(f"NBitsLinear: {bits}-bit weights have no onnxruntime MatMulNBits kernel (2/4/8 only)")
        k = q.shape[0]
        group = k if group_size == -1 else group_size
        groups = torch.arange(k, dtype=torch.int32) // group
        g_idx = groups if g_idx is None else g_idx.to(torch.int32)
        perm = None
        if not torch.equal(g_idx, groups):
            order = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[order], groups):
                raise ValueError(
                    "NBitsLinear.from_gptq: g_idx does not assign exactly group_size channels to each group; "
                    "cannot map it onto MatMulNBits blocks"
                )
            perm, q = order.to(torch.int64), q[order]
        try:  # one home for the block rule: training's int8 activation blocks follow it too
            block = nbits_block_size(group, k)
        except ConfigError as error:
            raise ValueError(f"NBitsLinear: {error}") from None
        k_blocks = math.ceil(k / block)
        block_group = (torch.arange(k_blocks) * block) // group  # group of each block
        s = scales.float()[block_group].T.contiguous()  # [N, k_blocks]
        zb = z[block_group].T.contiguous()
        return cls.from_integers(q.T, zb, s, bits=bits, block_size=block, bias=bias, perm=perm,
                                 accuracy_level=accuracy_level)

    @classmethod
    def from_bnb_int8(cls, layer: nn.Module, *, block_size: int = 128, accuracy_level: int = 4) -> NBitsLinear:
        """From a bitsandbytes ``Linear8bitLt`` (inference weights): ``code = CB + 128``, ``scale = SCB / 127``.

        Exact for the weight; the activations are not split into outliers as bnb does, so compare with the
        lossy tier (serving default ``accuracy_level`` 4).
        """
        cb, scb, _ = linear8bit_state(layer)
        n, k = cb.shape
        block = min(block_size, 1 << max(4, math.ceil(math.log2(k))))
        k_blocks = math.ceil(k / block)
        q = cb.to(torch.int32) + 128
        scales = (scb.float() / 127.0).unsqueeze(1).expand(n, k_blocks)
        zeros = torch.full((n, k_blocks), 128, dtype=torch.int32)
        return cls.from_integers(q, zeros, scales, bits=8, block_size=block, bias=layer.bias,
                                 accuracy_level=accuracy_level)

    @classmethod
    def from_bnb_4bit(cls, layer: nn.Module, *, block_size: int = 32, accuracy_level: int = 4) -> NBitsLinear:
        """From a bitsandbytes ``Linear4bit``: dequantize (fp32), then round-to-nearest int4 (lossy)."""
        return cls.from_float(linear4bit_state(layer).dequantize(), layer.bias, bits=4, block_size=block_size,
                              accuracy_level=accuracy_level)

    # --- math ----------------------------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]`` in the original input-channel order (the perm undone)."""
        w = contrib.dequantize_nbits(self.qweight, self.scales, self.zero_points, self.in_features,
                                      self.out_features, self.bits, self.block_size)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    def lowering(self) -> contrib.ContribNode:
        """The MatMulNBits node both builders emit (the bias stays outside it)."""
        return contrib.ContribNode(
            contrib.MATMUL_NBITS, (self.qweight, self.scales, self.zero_points),
            (self.in_features, self.out_features, self.bits, self.block_size, self.accuracy_level),
            permutation=self.perm, default_inputs=self._default_inputs)

    def can_fuse_with(self, others: Sequence[nn.Module]) -> bool:
        """Siblings (same type and K) concatenate along N into one node: same bits, blocks, accuracy level and
        input permutation."""
        same = all((b.bits, b.block_size, b.accuracy_level) == (self.bits, self.block_size, self.accuracy_level)
                   for b in others)
        perms = [self.perm, *(b.perm for b in others)]
        same_perm = all(p is None for p in perms) or (
            all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms))
        return same and same_perm

    def has_default_zero_points(self) -> bool:
        """Every zero point equals MatMulNBits' default ``2**(bits-1)``: the input can be left out (same result)."""
        zp = self.zero_points
        return bool(torch.equal(zp, default_zero_points(zp.shape[0], int(self.qweight.shape[1]), int(self.bits))))

    def _default_inputs(self) -> frozenset[str]:
        return frozenset({"zero_points"}) if self.has_default_zero_points() else frozenset()

    # x ──> [Gather(perm, axis=-1)] ──> com.microsoft.MatMulNBits ──> [Add(bias)] ──> y
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowering()(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, act_order={self.perm is not None}, accuracy_level={self.accuracy_level}")
