"""The lowering machinery both builders share: contrib-op schemas, custom ops and their translations.

onnx ships no schemas for ``com.microsoft`` operators, and onnxscript looks an operator's schema up before
it emits a node, so each contrib op this package emits is registered once as an ``onnx.defs.OpSchema``
(:func:`contrib_schema`, :func:`register_schema`: only the inputs and attributes this package uses;
onnxruntime validates against its own full schema).

Each quantized matmul is a ``torch.library.custom_op`` in the ``adalora_export`` namespace: its eager
implementation reproduces the onnxruntime kernel's arithmetic at ``accuracy_level`` 0, its fake
implementation gives ``torch.export`` the output shape, and :data:`CUSTOM_TRANSLATION_TABLE` maps it to one
contrib node for ``torch.onnx.export(..., custom_translation_table=...)``. This route was chosen over
post-export graph surgery because the node is emitted with its final inputs and attributes at the place
the module sits, with no name matching afterwards.

One lowering for both builders: a single-node op is a :class:`ContribOp` (node type, the twin's tensors
and the attributes, in the custom op's argument order) and a twin module's ``lowering()`` returns it with
the module's values as a :class:`ContribNode`. The twin's forward calls the custom op through it (so the
dynamo path's translation, generated from the same :class:`ContribOp` by :func:`register_op`, emits it),
and the fast path emits it through its node list (``fastpath.linear.LinearEmitter``)::

    twin.lowering() ─> ContribNode ─┬─> forward: torch.ops.adalora_export.<op> ─> translation ─> node (dynamo)
                                    └─> LinearEmitter: initializers + node                         (fast path)

A lowering that is a pattern of standard nodes (the LLM.int8 emulation, ``kinds/bnb8.py``) is a
:class:`PatternOp`: its pattern is written once against a :class:`PatternBuilder`, which the dynamo path's
translation (onnxscript) and the fast path's emitter each implement (constants, the layer's tensors, and
K/N: static in the fast path); ``lowering()`` returns it as a :class:`PatternNode`.

Each op is registered where it is defined (:func:`register_op`): MatMulNBits here, the op every
NBits twin and the fast path's quantized lm_head share; a base kind's own op in its file under
:mod:`adalora_deploy.export.build.kinds`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import onnx
import torch
from onnxscript import opset18 as _op
from onnxscript import values as _values

from adalora_deploy.gptq.int8_compute import fake_quantize_activations

__all__ = [
    "CONTRIB_OPS",
    "CUSTOM_TRANSLATION_TABLE",
    "FLOAT_TYPES",
    "MATMUL_NBITS",
    "MSFT_DOMAIN",
    "ContribNode",
    "ContribOp",
    "PatternBuilder",
    "PatternNode",
    "PatternOp",
    "contrib_schema",
    "dequantize_nbits",
    "quantized_op_names",
    "register_contrib_schemas",
    "register_op",
    "register_schema",
]

MSFT_DOMAIN = "com.microsoft"

FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]
"""The float types a schema's T1 takes."""


def contrib_schema(name: str, inputs, outputs, attributes, type_constraints) -> onnx.defs.OpSchema:
    """A ``com.microsoft`` schema with only what this package emits: ``inputs`` ``(name, type, optional)``,
    ``outputs`` ``(name, type)``, integer ``attributes`` ``(name, required, default)``."""
    F = onnx.defs.OpSchema.FormalParameter
    O = onnx.defs.OpSchema.FormalParameterOption
    A = onnx.defs.OpSchema.Attribute
    T = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        name,
        MSFT_DOMAIN,
        1,
        inputs=[F(n, t, "", param_option=O.Optional if opt else O.Single) for n, t, opt in inputs],
        outputs=[F(n, t) for n, t in outputs],
        type_constraints=type_constraints,
        attributes=[A(n, T.INT, "", required=req) if req else A(n, onnx.helper.make_attribute(n, d)) for n, req, d in attributes],
    )


def register_schema(schema: onnx.defs.OpSchema) -> None:
    """Register a ``com.microsoft`` schema onnxscript needs before it emits the node (idempotent)."""
    if not onnx.defs.has(schema.name, MSFT_DOMAIN):
        onnx.defs.register_schema(schema)


def register_contrib_schemas() -> None:
    """Register the schema of the shared ops defined here (MatMulNBits; idempotent). A kind's own op
    registers its schema in its kind file with :func:`register_schema`."""
    register_schema(contrib_schema(
        "MatMulNBits",
        [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
         ("g_idx", "T4", True), ("bias", "T1", True)],
        [("Y", "T1")],
        [("K", True, 0), ("N", True, 0), ("bits", False, 4), ("block_size", True, 0), ("accuracy_level", False, 0)],
        [("T1", FLOAT_TYPES, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
         ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"], ""),
         ("T4", ["tensor(int32)"], "")],
    ))


register_contrib_schemas()
_MSFT = _values.Opset(MSFT_DOMAIN, 1)

def _unpack_along_last(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack uint8 bytes holding ``8 // bits`` values each, low bits first, keeping ``count`` values."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :count]


def dequantize_nbits(
    qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, K: int, N: int, bits: int, block_size: int
) -> torch.Tensor:
    """MatMulNBits' weight as fp32 ``[N, K]``: ``scale[n, b] * (q[n, k] - zero[n, b])`` with ``b = k // block_size``.

    Args:
        qweight: uint8 ``[N, k_blocks, block_size * bits / 8]``, packed along K, low bits first.
        scales: float ``[N, k_blocks]``.
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed along the blocks like ``qweight``.
        K, N, bits, block_size: the node's attributes.
    """
    k_blocks = qweight.shape[1]
    q = _unpack_along_last(qweight, bits, block_size).float()  # [N, k_blocks, block_size]
    z = _unpack_along_last(zero_points, bits, k_blocks).float()  # [N, k_blocks]
    w = (q - z.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(N, k_blocks * block_size)[:, :K]


INT8_ACCURACY_LEVEL = 4
"""MatMulNBits ``accuracy_level`` of onnxruntime's int8 compute path on CPU."""
INT8_COMPUTE_BITS = (4, 8)
"""Weight widths whose accuracy_level-4 arithmetic the torch op reproduces (tests/test_int8_compute.py)."""


@torch.library.custom_op("adalora_export::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    K: int,
    N: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """``x @ W.T`` with W from :func:`dequantize_nbits`: onnxruntime's CPU arithmetic at ``accuracy_level`` 0
    (fp32 activations) and, for 4- and 8-bit weights at 4, its int8 activation blocks
    (:func:`adalora_deploy.gptq.int8_compute.fake_quantize_activations`, proven op by op)."""
    weight = dequantize_nbits(qweight, scales, zero_points, K, N, bits, block_size).to(x.dtype)
    if accuracy_level == INT8_ACCURACY_LEVEL and bits in INT8_COMPUTE_BITS:
        x = fake_quantize_activations(x, block_size)
    return torch.matmul(x, weight.T)


@matmul_nbits.register_fake
def _(x, qweight, scales, zero_points, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@dataclass(frozen=True)
class ContribOp:
    """A ``com.microsoft`` node that one custom op lowers to: the single description both builders read.

    The custom op's arguments are ``x``, then :attr:`inputs`, then :attr:`attributes`, in this order; the
    node's inputs are ``x`` and :attr:`inputs` (the twin's buffer names, which the fast path also uses for
    the initializer names ``<module>.<input>``).
    """

    op_type: str
    torch_op: str
    """The custom op's name in the ``adalora_export`` namespace."""
    inputs: tuple[str, ...]
    attributes: tuple[str, ...]
    """Integer attributes; ``N`` (output features) is summed when the fast path fuses siblings along N."""
    quantized: bool = True
    """The node computes with quantized weights: the manifest counts it (:func:`quantized_op_names`)."""


def _no_defaults() -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class ContribNode:
    """One twin module's :class:`ContribOp` with its values (what ``lowering()`` returns).

    Attributes:
        op: the node.
        inputs: tensors for ``op.inputs``, in order.
        attributes: values for ``op.attributes``, in order.
        permutation: gather ``x`` along its last axis first (GPTQ act-order), or None.
        float32_only: the fast path builds this node in fp32 graphs only.
        default_inputs: which inputs equal the op's default for a left-out input (same result): the fast path
            leaves them out, the dynamo path passes every custom op argument. Called only by the fast path
            (it reads buffer values, which ``torch.export`` cannot).
    """

    op: ContribOp
    inputs: tuple[torch.Tensor, ...]
    attributes: tuple[int, ...]
    permutation: torch.Tensor | None = None
    float32_only: bool = False
    default_inputs: Callable[[], frozenset[str]] = _no_defaults

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The node in torch: the custom op (eager arithmetic; ``torch.export`` records the op itself)."""
        if self.permutation is not None:
            x = torch.index_select(x, -1, self.permutation)
        return getattr(torch.ops.adalora_export, self.op.torch_op)(x, *self.inputs, *self.attributes)

    def named_inputs(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.op.inputs, self.inputs))

    def attribute_dict(self) -> dict[str, int]:
        return {name: int(value) for name, value in zip(self.op.attributes, self.attributes)}

    @staticmethod
    def along_n(nodes: Sequence[ContribNode]) -> ContribNode:
        """Sibling nodes as one along N (their twins' ``can_fuse_with`` said they can be): every input
        concatenated along its first axis, ``N`` summed, an input left out only where every member leaves it out."""
        first = nodes[0]
        if len(nodes) == 1:
            return first
        n_index = first.op.attributes.index("N")
        attributes = list(first.attributes)
        attributes[n_index] = sum(int(node.attributes[n_index]) for node in nodes)
        inputs = tuple(torch.cat(parts, 0) for parts in zip(*(node.inputs for node in nodes)))
        left_out = lambda: frozenset.intersection(*(node.default_inputs() for node in nodes))  # noqa: E731
        return dataclasses.replace(first, inputs=inputs, attributes=tuple(attributes), default_inputs=left_out)


def _translation(op: ContribOp):
    """The onnxscript translation of ``op``'s custom op: one node with the same inputs and attributes.

    The exporter reads which arguments are attributes from the signature (``int`` annotations), so the
    function gets an explicit one built from ``op``."""
    tensors = ("x", *op.inputs)
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in tensors]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)
                   for name in op.attributes]
    signature = inspect.Signature(parameters)

    def translate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        return getattr(_MSFT, op.op_type)(*(bound[name] for name in tensors),
                                          **{name: bound[name] for name in op.attributes})

    return _named(translate, signature, op.torch_op, {name: int for name in op.attributes})


def _named(translate, signature: inspect.Signature, torch_op: str, annotations: dict):
    translate.__signature__ = signature
    translate.__annotations__ = annotations
    translate.__name__ = translate.__qualname__ = f"_{torch_op}_onnx"
    return translate


class PatternBuilder(Protocol):
    """Where a node pattern is emitted: the fast path's node list or onnxscript (the dynamo path)."""

    def op(self, op_type: str, *inputs, **attributes):
        """One default-domain node; returns its output."""

    def ints(self, *values: int):
        """A 1-D int64 constant."""

    def float(self, value: float):
        """A scalar fp32 constant."""

    def tensor(self, name: str):
        """The layer's tensor ``name`` (the fast path writes its initializer on first use)."""

    def rows(self, x, weight: str):
        """``(lead, x2, n)``: x's leading shape, x as ``[-1, K]`` rows, and ``[N]``, where the layer's tensor
        ``weight`` is ``[K, N]`` (the fast path's K and N are static; onnxscript reads them from ``weight``)."""


@dataclass(frozen=True)
class PatternOp:
    """A twin's lowering that is a pattern of standard nodes, not one contrib node (the LLM.int8 emulation).

    The custom op's arguments are ``x``, then :attr:`inputs` (tensors), then :attr:`attributes` (Python
    scalars), in this order; :attr:`pattern` ``(builder, x, *attributes)`` writes its nodes once against a
    :class:`PatternBuilder`, and both builders hand it theirs. The pattern computes everything the twin
    does, bias included (the fast path adds nothing around it).
    """

    name: str
    """What the pattern emulates, for messages."""
    torch_op: str
    """The custom op's name in the ``adalora_export`` namespace."""
    inputs: tuple[str, ...]
    attributes: tuple[tuple[str, type], ...]
    """``(name, type)`` of each scalar argument (``int`` or ``float``), equal across fused siblings."""
    pattern: Callable[..., object]
    n_axes: tuple[int, ...]
    """Per input, the axis along which the fast path concatenates siblings fused along N."""
    quantized_op: str | None = None
    """The pattern's node that computes with the quantized weights (e.g. ``MatMulInteger``), which the manifest
    counts (:func:`quantized_op_names`); None: the manifest counts none of its nodes."""


@dataclass(frozen=True)
class PatternNode:
    """One twin module's :class:`PatternOp` with its values (what ``lowering()`` returns)."""

    op: PatternOp
    inputs: tuple[torch.Tensor, ...]
    attributes: tuple
    float32_only: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The pattern in torch: the custom op (eager arithmetic; ``torch.export`` records the op itself)."""
        return getattr(torch.ops.adalora_export, self.op.torch_op)(x, *self.inputs, *self.attributes)

    def named_inputs(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.op.inputs, self.inputs))

    @staticmethod
    def along_n(nodes: Sequence[PatternNode]) -> PatternNode:
        """Sibling patterns as one along N: each input concatenated along its ``n_axes`` entry (the
        attributes are the first member's; the twins' ``can_fuse_with`` requires them equal)."""
        first = nodes[0]
        if len(nodes) == 1:
            return first
        inputs = tuple(torch.cat(parts, axis) for parts, axis in zip(zip(*(n.inputs for n in nodes)), first.op.n_axes))
        return dataclasses.replace(first, inputs=inputs)


class _OnnxScriptBuilder:
    """:class:`PatternBuilder` on onnxscript: constants are Constant nodes, K and N read from the weight."""

    def __init__(self, tensors: dict) -> None:
        self.tensors = tensors

    def op(self, op_type: str, *inputs, **attributes):
        return getattr(_op, op_type)(*inputs, **attributes)

    def ints(self, *values: int):
        return _op.Constant(value_ints=list(values))

    def float(self, value: float):
        return _op.Constant(value_float=float(value))

    def tensor(self, name: str):
        return self.tensors[name]

    def rows(self, x, weight: str):
        k_and_n = _op.Shape(self.tensors[weight])
        k = _op.Slice(k_and_n, self.ints(0), self.ints(1))
        n = _op.Slice(k_and_n, self.ints(1), self.ints(2))
        lead = _op.Slice(_op.Shape(x), self.ints(0), self.ints(-1))
        return lead, _op.Reshape(x, _op.Concat(self.ints(-1), k, axis=0)), n


def _pattern_translation(op: PatternOp):
    """The onnxscript translation of ``op``'s custom op: its pattern on an onnxscript builder."""
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ("x", *op.inputs)]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
                   for name, kind in op.attributes]
    signature = inspect.Signature(parameters)

    def translate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        builder = _OnnxScriptBuilder({name: bound[name] for name in op.inputs})
        return op.pattern(builder, bound["x"], *(bound[name] for name, _ in op.attributes))

    return _named(translate, signature, op.torch_op, dict(op.attributes))


CONTRIB_OPS: list[ContribOp | PatternOp] = []
"""Every registered lowering (:func:`register_op`): the dynamo path's translations are generated from these."""
CUSTOM_TRANSLATION_TABLE: dict = {}
"""Pass as ``torch.onnx.export(..., custom_translation_table=CUSTOM_TRANSLATION_TABLE)``; filled by
:func:`register_op` as each op's module is imported (a twin cannot exist before its op is registered)."""


def register_op(op: ContribOp | PatternOp) -> ContribOp | PatternOp:
    """Add a lowering: its custom op ``adalora_export::<op.torch_op>`` (defined before) gets its translation."""
    key = getattr(torch.ops.adalora_export, op.torch_op).default
    CUSTOM_TRANSLATION_TABLE[key] = _translation(op) if isinstance(op, ContribOp) else _pattern_translation(op)
    CONTRIB_OPS.append(op)
    return op


def quantized_op_names() -> frozenset[str]:
    """``[domain::]op_type`` of every registered node that computes with quantized weights (the manifest's
    ``quantized_ops``); a kind's op counts once its kind file is imported."""
    names = set()
    for op in CONTRIB_OPS:
        if isinstance(op, ContribOp) and op.quantized:
            names.add(f"{MSFT_DOMAIN}::{op.op_type}")
        elif isinstance(op, PatternOp) and op.quantized_op:
            names.add(op.quantized_op)
    return frozenset(names)


MATMUL_NBITS = register_op(ContribOp("MatMulNBits", "matmul_nbits", ("qweight", "scales", "zero_points"),
                                     ("K", "N", "bits", "block_size", "accuracy_level")))
"""The shared op: GPTQ's twin, the bnb serving twins and the fast path's quantized lm_head all lower to it."""
