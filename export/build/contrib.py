"""onnxruntime contrib-op schemas (domain ``com.microsoft``) and the custom torch ops that map onto them.

onnx ships no schemas for ``com.microsoft`` operators, and onnxscript looks an operator's schema up before
it emits a node, so each contrib op this package emits is registered once here as an ``onnx.defs.OpSchema``
(only the inputs and attributes this package uses; onnxruntime validates against its own full schema).

Each quantized matmul is a ``torch.library.custom_op`` in the ``adalora_export`` namespace: its eager
implementation reproduces the onnxruntime kernel's arithmetic at ``accuracy_level`` 0, its fake
implementation gives ``torch.export`` the output shape, and :data:`CUSTOM_TRANSLATION_TABLE` maps it to one
contrib node for ``torch.onnx.export(..., custom_translation_table=...)``. This route was chosen over
post-export graph surgery because the node is emitted with its final inputs and attributes at the place
the module sits, with no name matching afterwards.

One lowering for both builders: a single-node op is a :class:`ContribOp` (node type, the twin's tensors
and the attributes, in the custom op's argument order) and a twin module's ``lowering()`` returns it with
the module's values as a :class:`ContribNode`. The twin's forward calls the custom op through it (so the
dynamo path's translation, generated from the same :class:`ContribOp`, emits it), and the fast path emits
it through its node list (``fastpath.linear.LinearEmitter``)::

    twin.lowering() ─> ContribNode ─┬─> forward: torch.ops.adalora_export.<op> ─> translation ─> node (dynamo)
                                    └─> LinearEmitter: initializers + node                         (fast path)

The LLM.int8 emulation is a pattern of standard nodes, not one node: :func:`int8_lt_pattern` writes it
once against a :class:`PatternBuilder`, which the dynamo path's translation and the fast path's
``LinearEmitter._int8`` each implement (constants, the layer's tensors, and K/N: static in the fast path).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import onnx
import torch
from onnxscript import opset18 as _op
from onnxscript import values as _values

from adalora_deploy.backends.bnb import dequantize_bnb4
from adalora_deploy.gptq.int8_compute import fake_quantize_activations

__all__ = [
    "CONTRIB_OPS",
    "CUSTOM_TRANSLATION_TABLE",
    "MATMUL_BNB4",
    "MATMUL_NBITS",
    "MSFT_DOMAIN",
    "ContribNode",
    "ContribOp",
    "PatternBuilder",
    "dequantize_nbits",
    "int8_lt_pattern",
    "register_contrib_schemas",
]

MSFT_DOMAIN = "com.microsoft"

_FLOAT = ["tensor(float)", "tensor(float16)"]


def _schema(name: str, inputs, outputs, attributes, type_constraints) -> onnx.defs.OpSchema:
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


def register_contrib_schemas() -> None:
    """Register the ``com.microsoft`` schemas this package emits (idempotent)."""
    schemas = [
        _schema(
            "MatMulNBits",
            [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
             ("g_idx", "T4", True), ("bias", "T1", True)],
            [("Y", "T1")],
            [("K", True, 0), ("N", True, 0), ("bits", False, 4), ("block_size", True, 0), ("accuracy_level", False, 0)],
            [("T1", _FLOAT, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
             ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"], ""),
             ("T4", ["tensor(int32)"], "")],
        ),
        _schema(
            "MatMulBnb4",
            [("A", "T1", False), ("B", "T2", False), ("absmax", "T1", False)],
            [("Y", "T1")],
            [("K", True, 0), ("N", True, 0), ("block_size", True, 0), ("quant_type", True, 0),
             ("training_mode", False, 0), ("transB", False, 1)],
            [("T1", _FLOAT, ""), ("T2", ["tensor(uint8)"], "")],
        ),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, MSFT_DOMAIN):
            onnx.defs.register_schema(schema)


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


@torch.library.custom_op("adalora_export::matmul_bnb4", mutates_args=())
def matmul_bnb4(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, K: int, N: int, block_size: int, quant_type: int
) -> torch.Tensor:
    """``x @ W.T`` with W from :func:`dequantize_bnb4` (what MatMulBnb4 and bnb's CPU forward compute)."""
    weight = dequantize_bnb4(packed, absmax, K, N, block_size, quant_type).to(x.dtype)
    return torch.matmul(x, weight.T)


@matmul_bnb4.register_fake
def _(x, packed, absmax, K, N, block_size, quant_type):
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


MATMUL_NBITS = ContribOp("MatMulNBits", "matmul_nbits", ("qweight", "scales", "zero_points"),
                         ("K", "N", "bits", "block_size", "accuracy_level"))
MATMUL_BNB4 = ContribOp("MatMulBnb4", "matmul_bnb4", ("packed", "absmax"), ("K", "N", "block_size", "quant_type"))
CONTRIB_OPS = (MATMUL_NBITS, MATMUL_BNB4)
"""Every single-node op: the dynamo path's translations are generated from these."""


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

    translate.__signature__ = signature
    translate.__annotations__ = {name: int for name in op.attributes}
    translate.__name__ = translate.__qualname__ = f"_{op.torch_op}_onnx"
    return translate


BNB_INV_127_SQUARED = 6.200124e-05
"""bitsandbytes' int8_mm_dequant constant for 1 / 127**2."""


@torch.library.custom_op("adalora_export::int8_lt_matmul", mutates_args=())
def int8_lt_matmul(
    x: torch.Tensor, cb_t: torch.Tensor, scb: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, threshold: float
) -> torch.Tensor:
    """bitsandbytes LLM.int8 eval forward (0.50 default kernels), written out so ONNX can reproduce it.

    Args:
        x: [..., K] activations.
        cb_t: int8 [K, N] weight codes (``CB.T``).
        scb: fp32 [N] per-output absmax (``SCB``).
        weight_t: fp32 [K, N] dequantized weight ``(CB * SCB * (1/127)).T`` for the outlier columns.
        bias: fp32 [N] (zeros when the layer has none).
        threshold: outlier threshold (<= 0: no outlier decomposition).
    """
    k, n = cb_t.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    a = x2.to(torch.float16).float()
    outlier_cols = None
    if threshold > 0:
        big = a.abs() >= threshold
        outlier_cols = big.any(dim=0)
        a = a.masked_fill(big, 0.0)
    row_stats = a.abs().amax(dim=1, keepdim=True)
    q = torch.round(a * (row_stats.reciprocal() * 127.0))  # torch evaluates 127.0 / t as t.reciprocal() * 127
    if outlier_cols is not None:
        q = q.masked_fill(outlier_cols, 0.0)
    acc = torch.matmul(q.to(torch.int64), cb_t.to(torch.int64)).to(torch.int32)  # exact integer products
    out = acc.float() * (row_stats * scb.unsqueeze(0)) * BNB_INV_127_SQUARED + bias
    if outlier_cols is not None:
        out = out + torch.matmul(x2.float().masked_fill(~outlier_cols, 0.0), weight_t)
    return out.reshape(*lead, n).to(x.dtype)


@int8_lt_matmul.register_fake
def _(x, cb_t, scb, weight_t, bias, threshold):
    return x.new_empty((*x.shape[:-1], cb_t.shape[1]))


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

    def rows(self, x):
        """``(lead, x2, n)``: x's leading shape, x as ``[-1, K]`` rows, and ``[N]`` (the fast path's K and N are
        static; onnxscript reads them from ``cb_t``)."""


def int8_lt_pattern(b: PatternBuilder, x, threshold: float):
    """The nodes of :func:`int8_lt_matmul`, written once for both builders (the LLM.int8 lowering)::

        x ─> Reshape[-1,K] ─> Cast(fp16) ─> Cast(fp32) = a
         a ─> Abs ─> GreaterOrEqual(threshold) = big ─> Cast ─> ReduceMax(rows) ─> Cast(bool) = outlier_cols
         a ─> Where(big, 0) ─> Abs ─> ReduceMax(cols) = row_stats ─> Reciprocal ─> Mul(127) = s
         Mul(a, s) ─> Round ─> Where(outlier_cols, 0) ─> Cast(int8) ─> MatMulInteger(cb_t) ─> Cast(fp32)
           ─> Mul(row_stats * scb) ─> Mul(1/127^2) ─> Add(bias) ─> Add(MatMul(Where(outlier_cols, x, 0), weight_t))
           ─> Reshape[..., N]

    The outlier nodes exist only with ``threshold > 0``. ``127 / row_stats`` is Reciprocal then Mul, as torch
    evaluates it (a Div flips .5 rounding ties)."""
    F, B, I8 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL, onnx.TensorProto.INT8
    lead, x2, n = b.rows(x)
    a = b.op("Cast", b.op("Cast", x2, to=onnx.TensorProto.FLOAT16), to=F)
    zero = b.float(0.0)
    if threshold > 0:
        big = b.op("GreaterOrEqual", b.op("Abs", a), b.float(threshold))
        outlier_cols = b.op("Cast", b.op("ReduceMax", b.op("Cast", big, to=F), b.ints(0), keepdims=1), to=B)
        a = b.op("Where", big, zero, a)
    row_stats = b.op("ReduceMax", b.op("Abs", a), b.ints(1), keepdims=1)
    scale = b.op("Mul", b.op("Reciprocal", row_stats), b.float(127.0))
    q = b.op("Round", b.op("Mul", a, scale))
    if threshold > 0:
        q = b.op("Where", outlier_cols, zero, q)
    acc = b.op("MatMulInteger", b.op("Cast", q, to=I8), b.tensor("cb_t"))
    out = b.op("Mul", b.op("Cast", acc, to=F), b.op("Mul", row_stats, b.op("Unsqueeze", b.tensor("scb"), b.ints(0))))
    out = b.op("Add", b.op("Mul", out, b.float(BNB_INV_127_SQUARED)), b.tensor("bias"))
    if threshold > 0:
        out = b.op("Add", out, b.op("MatMul", b.op("Where", outlier_cols, x2, zero), b.tensor("weight_t")))
    return b.op("Reshape", out, b.op("Concat", lead, n, axis=0))


class _OnnxScriptBuilder:
    """:class:`PatternBuilder` on onnxscript: constants are Constant nodes, K and N read from ``cb_t``."""

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

    def rows(self, x):
        k_and_n = _op.Shape(self.tensors["cb_t"])
        k = _op.Slice(k_and_n, self.ints(0), self.ints(1))
        n = _op.Slice(k_and_n, self.ints(1), self.ints(2))
        lead = _op.Slice(_op.Shape(x), self.ints(0), self.ints(-1))
        return lead, _op.Reshape(x, _op.Concat(self.ints(-1), k, axis=0)), n


def _int8_lt_matmul_onnx(x, cb_t, scb, weight_t, bias, threshold: float):
    tensors = {"cb_t": cb_t, "scb": scb, "weight_t": weight_t, "bias": bias}
    return int8_lt_pattern(_OnnxScriptBuilder(tensors), x, threshold)


CUSTOM_TRANSLATION_TABLE = {
    **{getattr(torch.ops.adalora_export, op.torch_op).default: _translation(op) for op in CONTRIB_OPS},
    torch.ops.adalora_export.int8_lt_matmul.default: _int8_lt_matmul_onnx,
}
"""Pass as ``torch.onnx.export(..., custom_translation_table=CUSTOM_TRANSLATION_TABLE)``."""
