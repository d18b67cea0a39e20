"""Direct ONNX graph builder ("fast path") for Llama-family decoders (llama, mistral, qwen2).

Instead of tracing the model with ``torch.onnx.export(dynamo=True)`` (minutes, an unfused graph), this
module walks the export twin (a transformers causal LM after ``export.api.convert_for_export``) and emits
onnxruntime's fused contrib ops node by node, streaming each weight to ``model.onnx.data`` as it goes::

    input_ids ─> Gather / GatherBlockQuantized (embed_tokens) ─> h
    attention_mask ─> positions = cumsum - 1 (pads 1), last seq    ┐ shared by all layers
                   ─> bias [B,1,S,T] = mask ? 0 : min              │
                   ─> seqlens_k = T - 1 (every row), total = T     ┘
    per layer i:
      h ─> [Skip]SimplifiedLayerNormalization ─> x
      x ─> q/k/v projection (fused when the bases allow it) ─> Split ─> [+ LoRA branch] ─> q, k, v
      q, k ─> RotaryEmbedding(positions)
      GroupQueryAttention(q, k, v, past_i, seqlens_k, total, attention_bias=bias) ─> attn, present_i
      attn ─> o_proj ─> SkipSimplifiedLayerNormalization(+ residual) ─> x
      x ─> gate/up projection (fused) ─> Split ─> [+ LoRA] ─> Sigmoid/Mul/Mul ─> down_proj
    SkipSimplifiedLayerNormalization(final norm) ─> lm_head (MatMul / Gemm / MatMulNBits) ─> logits

The graph keeps the interface of :mod:`export.graph` exactly (same input and output names, dtypes and
axes, adapter inputs after the past tensors) and computes the same function as
:class:`export.graph.DecoderWrapper`, including left-padded batches.

Left padding and GroupQueryAttention: GQA places a row's new keys at ``seqlens_k[b] + 1 - seq`` and applies
its causal mask from there, i.e. it assumes right padding. Here every row claims the full length
(``seqlens_k = total_seq - 1``), which matches the left-padded layout (all rows end at ``total_seq``), and
the pad keys are masked by GQA's ``attention_bias`` input. Rotary embedding is applied before GQA by
``RotaryEmbedding`` nodes fed the per-row positions (``cumsum(mask) - 1``), because GQA's own rotary
(``do_rotary``) derives positions from ``seqlens_k`` (right padding), and with ``position_ids`` reads only
their first element on a prompt. So DecoderSession needs no change to be correct. Because every present
tensor comes from GQA, a runner may also bind ``past`` and ``present`` to one preallocated buffer (GQA then
appends in place): the graph says so in its metadata (:data:`KV_SHARE_BUFFER_METADATA`), which
``DecoderSession.generate_greedy`` and onnxruntime-genai (``past_present_share_buffer``) use.

Linear modules map to nodes as follows (``<m>`` = the module path, ``/`` separated, in node names)::

    nn.Linear             MatMul(W^T) [+ Add(bias)]
    NBitsLinear           [Gather(perm)] + com.microsoft.MatMulNBits (buffers and attributes as is) [+ Add]
    Bnb4Linear            com.microsoft.MatMulBnb4 [+ Add]
    Int8EmulationLinear   the MatMulInteger pattern of export.contrib._int8_lt_matmul_onnx
    LowRankBranch         base (scope <m>/base) + MatMul(lora_A) + MatMul(lora_B) + Add (scope <m>)

Branch MatMuls are named ``/<m>/MatMul_0`` and ``/<m>/MatMul_1``, the base ``/<m>/base/...`` or, when the
projections are fused, ``/<...>/qkv_proj/...`` and ``/<...>/gate_up_proj/...``, so
``export.api._adapter_matmuls`` (MatMul nodes whose scope is exactly a branch module) counts unchanged.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from adalora_deploy.errors import ExportError

from . import contrib
from .graph import DEFAULT_OPSET, ExportResult, adapter_input_names
from .modules import Bnb4Linear, Int8EmulationLinear, LowRankBranch, NBitsLinear, default_zero_points

__all__ = [
    "KV_SHARE_BUFFER_METADATA",
    "SUPPORTED_MODEL_TYPES",
    "FastPathUnsupported",
    "build_decoder",
    "quantize_table",
]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``config.model_type`` values the fast path builds; anything else raises :class:`FastPathUnsupported`."""
MSFT = contrib.MSFT_DOMAIN
EMBEDDING_BLOCK = 32
"""Block size of quantized embeddings / lm_head (onnxruntime's quantizer and the genai builder default)."""
LM_HEAD_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level of a quantized lm_head (int8 activations, as the genai builder's CPU int4)."""
_ALIGN = 64
"""Byte alignment of each tensor in the external data file."""
_INLINE_MAX_BYTES = 1024
"""Tensors up to this size stay inside the protobuf (constants, norms of tiny models)."""
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE types whose inverse frequencies do not depend on the sequence length (a fixed cos/sin table)."""
_INT64_MAX = np.iinfo(np.int64).max
_FP16_MASK_BIAS = -1e4
"""Additive mask for pad keys in fp16 graphs: large enough that exp() underflows to 0, small enough that a fully
masked (pad) query row stays finite (finfo(fp16).min plus a negative score overflows to -inf, and an all -inf
row would put NaN into the pad positions' keys and values). fp32 graphs use finfo(fp32).min, as transformers."""
KV_SHARE_BUFFER_METADATA = "adalora_deploy.kv_share_buffer"
"""Model metadata key set to ``"1"``: every present tensor comes from GroupQueryAttention, so past and present may
share one buffer. Same key as ``export.runtime.KV_SHARE_BUFFER_METADATA`` (runtime imports onnxruntime)."""

QuantizedTable = Literal["int4", "int8"] | None


class FastPathUnsupported(ExportError):
    """The model is outside what the fast path builds; the caller should fall back to ``export_decoder``."""


# --- weights and nodes ------------------------------------------------------------------------------------


def _np(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A contiguous numpy view (no copy for contiguous CPU tensors)."""
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor)
    return tensor.detach().cpu().contiguous().numpy()


class _WeightFile:
    """Appends tensors to the external data file one by one; returns protos that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self._file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        if array.nbytes <= _INLINE_MAX_BYTES:
            proto.raw_data = array.tobytes()
            return proto
        pad = (-self.offset) % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self._file.close()


class _Graph:
    """Nodes, initializers and constants of the graph under construction; node names ``/<scope>/<op>_<k>``."""

    def __init__(self, weights: _WeightFile, float_type: np.dtype) -> None:
        self.weights = weights
        self.float_type = np.dtype(float_type)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._counters: collections.Counter[str] = collections.Counter()
        self._constants: dict[tuple, str] = {}

    def initializer(self, name: str, array: torch.Tensor | np.ndarray) -> str:
        if name in self._names:
            raise ExportError(f"fast path: initializer {name!r} emitted twice")
        self._names.add(name)
        self.initializers.append(self.weights.tensor(name, _np(array)))
        return name

    def floats(self, name: str, tensor: torch.Tensor) -> str:
        """A float initializer in the graph's float type."""
        return self.initializer(name, _np(tensor.detach().to(torch.float32)).astype(self.float_type, copy=False))

    def has(self, name: str) -> bool:
        return name in self._names

    def const(self, values, dtype=np.int64, shape: Sequence[int] | None = None) -> str:
        """A shared small constant initializer (``/model/constants/<dtype>/<values>``)."""
        array = np.asarray(values, dtype=dtype)
        if shape is not None:
            array = array.reshape(shape)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/model/constants/{array.dtype.name}/{array.tolist()}"
            self._constants[key] = self.initializer(name, array)
        return self._constants[key]

    def op(self, op_type: str, inputs: Sequence[str], scope: str, *, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs) -> list[str]:
        """Append one node; returns its output names (generated unless ``outputs`` names them)."""
        key = f"/{scope}/{op_type}" if scope else f"/{op_type}"
        name = f"{key}_{self._counters[key]}"
        self._counters[key] += 1
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))
        return list(outputs)

    def op1(self, op_type: str, inputs: Sequence[str], scope: str, **kwargs) -> str:
        return self.op(op_type, inputs, scope, **kwargs)[0]


def _scope(path: str) -> str:
    return path.replace(".", "/")


# --- linear layers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Branch:
    """A LoRA branch's factors: initializer names, or graph input names in adapter-inputs mode."""

    lora_A: str
    lora_B: str


class _Emitter:
    """Emits linear modules (and fused groups of them) as ONNX nodes."""

    def __init__(self, graph: _Graph, adapter_inputs: dict[str, _Branch]) -> None:
        self.g = graph
        self.adapter_inputs = adapter_inputs

    # x ─> [base] ─> y (+ branch, see _branch)
    def linear(self, module: nn.Module, x: str, path: str) -> str:
        if isinstance(module, LowRankBranch):
            base = self.linear(module.base, x, f"{path}.base")
            return self._branch(module, x, base, path)
        return self._base([module], x, path)

    # x ──> base ─────────────────────────────────────> Add ──> y      (scope <path>)
    # └───> MatMul(lora_A [in, r]) ──> MatMul(lora_B [r, out]) ──┘
    def _branch(self, module: LowRankBranch, x: str, base: str, path: str) -> str:
        g, scope = self.g, _scope(path)
        if module.factors_as_inputs:
            branch = self.adapter_inputs[path]
            a, b = branch.lora_A, branch.lora_B
            if g.float_type != np.float32:
                a = g.op1("Cast", [a], scope, to=helper.np_dtype_to_tensor_dtype(g.float_type))
                b = g.op1("Cast", [b], scope, to=helper.np_dtype_to_tensor_dtype(g.float_type))
        else:
            a = g.floats(f"{path}.lora_A", module.lora_A)
            b = g.floats(f"{path}.lora_B", module.lora_B)
        down = g.op1("MatMul", [x, a], scope)
        up = g.op1("MatMul", [down, b], scope)
        return g.op1("Add", [base, up], scope)

    def group(self, modules: Sequence[tuple[str, nn.Module]], x: str, fused_path: str, fuse: bool) -> list[str]:
        """Outputs of several linears that read the same ``x`` (q/k/v, gate/up).

        With ``fuse`` and compatible bases, the bases become one node whose output is split; each member's
        LoRA branch is then added to its slice (exact: the same sums as the unfused graph)::

            x ─> fused base (N = sum N_i) ─> Split ─> y_i [─> Add(branch_i(x))]
        """
        bases = [(m.base if isinstance(m, LowRankBranch) else m) for _, m in modules]
        if fuse and len(modules) > 1 and _fusable(bases):
            fused = self._base(bases, x, fused_path)
            sizes = [int(b.out_features) for b in bases]
            parts = self.g.op("Split", [fused, self.g.const(sizes)], _scope(fused_path), outputs=len(sizes), axis=-1)
        else:
            parts = [self._base([b], x, f"{p}.base" if isinstance(m, LowRankBranch) else p)
                     for b, (p, m) in zip(bases, modules)]
        return [self._branch(m, x, part, p) if isinstance(m, LowRankBranch) else part
                for part, (p, m) in zip(parts, modules)]

    def _base(self, modules: Sequence[nn.Module], x: str, path: str) -> str:
        """One base node for ``modules`` concatenated along the output axis (one module: no concatenation)."""
        first = modules[0]
        if isinstance(first, LowRankBranch):  # a branch on a branch (not produced by convert_for_export)
            if len(modules) != 1:
                raise ExportError("fast path: cannot fuse nested LoRA branches")
            return self.linear(first, x, path)
        if type(first) is nn.Linear:
            return self._matmul(modules, x, path)
        if isinstance(first, NBitsLinear):
            return self._nbits(modules, x, path)
        if isinstance(first, Bnb4Linear):
            return self._bnb4(modules, x, path)
        if isinstance(first, Int8EmulationLinear):
            return self._int8(modules, x, path)
        raise FastPathUnsupported(f"fast path: no ONNX mapping for {path} ({type(first).__name__})")

    def _bias(self, modules: Sequence[nn.Module], y: str, path: str) -> str:
        biases = [getattr(m, "bias", None) for m in modules]
        if all(b is None for b in biases):
            return y
        parts = [torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(modules, biases)]
        bias = self.g.floats(f"{path}.bias", torch.cat(parts))
        return self.g.op1("Add", [y, bias], _scope(path))

    # x ─> MatMul(W^T [K, N]) ─> [Add(bias)]
    def _matmul(self, modules: Sequence[nn.Linear], x: str, path: str) -> str:
        g = self.g
        weight = torch.cat([m.weight.detach() for m in modules], 0) if len(modules) > 1 else modules[0].weight.detach()
        w_t = g.floats(f"{path}.MatMul.weight", weight.T)
        return self._bias(modules, g.op1("MatMul", [x, w_t], _scope(path)), path)

    # x ─> [Gather(perm, axis=-1)] ─> MatMulNBits(q, scales, zero_points) ─> [Add(bias)]
    def _nbits(self, modules: Sequence[NBitsLinear], x: str, path: str) -> str:
        g, first, scope = self.g, modules[0], _scope(path)
        if first.perm is not None:
            x = g.op1("Gather", [x, g.initializer(f"{path}.perm", first.perm)], scope, axis=-1)
        cat = (lambda name: torch.cat([getattr(m, name) for m in modules], 0)) if len(modules) > 1 else \
            (lambda name: getattr(first, name))
        scales = cat("scales")
        if g.float_type == np.float32:
            scales_name = g.initializer(f"{path}.scales", scales)
        else:
            scales_name = g.floats(f"{path}.scales", scales)
        inputs = [x, g.initializer(f"{path}.qweight", cat("qweight")), scales_name]
        if not all(_default_zero_points(m) for m in modules):
            inputs.append(g.initializer(f"{path}.zero_points", cat("zero_points")))
        n = sum(int(m.out_features) for m in modules)
        y = g.op1("MatMulNBits", inputs, scope, domain=MSFT, K=int(first.in_features), N=n, bits=int(first.bits),
                  block_size=int(first.block_size), accuracy_level=int(first.accuracy_level))
        return self._bias(modules, y, path)

    # x ─> MatMulBnb4(packed, absmax) ─> [Add(bias)]
    def _bnb4(self, modules: Sequence[Bnb4Linear], x: str, path: str) -> str:
        g, first = self.g, modules[0]
        if g.float_type != np.float32:
            raise FastPathUnsupported("fast path: MatMulBnb4 is built for fp32 graphs only")
        packed = torch.cat([m.packed for m in modules]) if len(modules) > 1 else first.packed
        absmax = torch.cat([m.absmax for m in modules]) if len(modules) > 1 else first.absmax
        n = sum(int(m.out_features) for m in modules)
        y = g.op1("MatMulBnb4", [x, g.initializer(f"{path}.packed", packed), g.initializer(f"{path}.absmax", absmax)],
                  _scope(path), domain=MSFT, K=int(first.in_features), N=n, block_size=int(first.block_size),
                  quant_type=1 if first.quant_type == "nf4" else 0)
        return self._bias(modules, y, path)

    # x ─> Reshape[-1,K] ─> Cast(fp16) ─> Cast(fp32) = a
    #  a ─> Abs ─> GreaterOrEqual(threshold) = big ─> Cast ─> ReduceMax(rows) ─> Cast(bool) = outlier_cols
    #  a ─> Where(big, 0) ─> Abs ─> ReduceMax(cols) = row_stats ─> Reciprocal ─> Mul(127) = s
    #  Mul(a, s) ─> Round ─> Where(outlier_cols, 0) ─> Cast(int8) ─> MatMulInteger(cb_t) ─> Cast(fp32)
    #    ─> Mul(row_stats * scb) ─> Mul(1/127^2) ─> Add(bias) ─> Add(MatMul(Where(outlier_cols, x, 0), weight_t))
    #    ─> Reshape[..., N]
    def _int8(self, modules: Sequence[Int8EmulationLinear], x: str, path: str) -> str:
        """The node pattern of ``export.contrib._int8_lt_matmul_onnx``, with static K and N."""
        g, first, scope = self.g, modules[0], _scope(path)
        if g.float_type != np.float32:
            raise FastPathUnsupported("fast path: the LLM.int8 emulation is built for fp32 graphs only")
        if len(modules) > 1:
            cb_t = torch.cat([m.cb_t for m in modules], 1)
            scb = torch.cat([m.scb for m in modules])
            weight_t = torch.cat([m.weight_t for m in modules], 1)
            bias = torch.cat([m.bias for m in modules])
        else:
            cb_t, scb, weight_t, bias = first.cb_t, first.scb, first.weight_t, first.bias
        k, n = int(cb_t.shape[0]), int(cb_t.shape[1])
        threshold = float(first.threshold)
        F, B, I8 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT8
        zero = g.const(0.0, np.float32)
        lead = g.op1("Slice", [g.op1("Shape", [x], scope), g.const([0]), g.const([-1])], scope)
        x2 = g.op1("Reshape", [x, g.const([-1, k])], scope)
        a = g.op1("Cast", [g.op1("Cast", [x2], scope, to=TensorProto.FLOAT16)], scope, to=F)
        outlier_cols = None
        if threshold > 0:
            big = g.op1("GreaterOrEqual", [g.op1("Abs", [a], scope), g.const(threshold, np.float32)], scope)
            col_max = g.op1("ReduceMax", [g.op1("Cast", [big], scope, to=F), g.const([0])], scope, keepdims=1)
            outlier_cols = g.op1("Cast", [col_max], scope, to=B)
            a = g.op1("Where", [big, zero, a], scope)
        row_stats = g.op1("ReduceMax", [g.op1("Abs", [a], scope), g.const([1])], scope, keepdims=1)
        s = g.op1("Mul", [g.op1("Reciprocal", [row_stats], scope), g.const(127.0, np.float32)], scope)
        q = g.op1("Round", [g.op1("Mul", [a, s], scope)], scope)
        if outlier_cols is not None:
            q = g.op1("Where", [outlier_cols, zero, q], scope)
        acc = g.op1("MatMulInteger", [g.op1("Cast", [q], scope, to=I8), g.initializer(f"{path}.cb_t", cb_t)], scope)
        stats = g.op1("Mul", [row_stats, g.op1("Unsqueeze", [g.initializer(f"{path}.scb", scb), g.const([0])], scope)],
                      scope)
        out = g.op1("Mul", [g.op1("Cast", [acc], scope, to=F), stats], scope)
        out = g.op1("Mul", [out, g.const(contrib.BNB_INV_127_SQUARED, np.float32)], scope)
        out = g.op1("Add", [out, g.initializer(f"{path}.bias", bias)], scope)
        if outlier_cols is not None:
            dense = g.op1("Where", [outlier_cols, x2, zero], scope)
            out = g.op1("Add", [out, g.op1("MatMul", [dense, g.initializer(f"{path}.weight_t", weight_t)], scope)],
                        scope)
        return g.op1("Reshape", [out, g.op1("Concat", [lead, g.const([n])], scope, axis=0)], scope)


def _default_zero_points(module: NBitsLinear) -> bool:
    """Every zero point equals MatMulNBits' default ``2**(bits-1)``: the input can be left out (same result)."""
    zp = module.zero_points
    return bool(torch.equal(zp, default_zero_points(zp.shape[0], int(module.qweight.shape[1]), int(module.bits))))


def _fusable(bases: Sequence[nn.Module]) -> bool:
    """Whether these base layers can be concatenated along N into one node with the same arithmetic."""
    first = bases[0]
    if any(type(b) is not type(first) for b in bases):
        return False
    if any(int(b.in_features) != int(first.in_features) for b in bases):
        return False
    if type(first) is nn.Linear:
        return all(b.weight.dtype == first.weight.dtype for b in bases)
    if isinstance(first, NBitsLinear):
        same = all((b.bits, b.block_size, b.accuracy_level) == (first.bits, first.block_size, first.accuracy_level)
                   for b in bases)
        perms = [b.perm for b in bases]
        same_perm = all(p is None for p in perms) or (
            all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms))
        return same and same_perm
    if isinstance(first, Bnb4Linear):
        # bnb blocks run over the flattened [N, K] weight: a member must end on a block boundary
        return all((b.block_size, b.quant_type) == (first.block_size, first.quant_type) for b in bases) and all(
            (int(b.out_features) * int(b.in_features)) % (2 * int(b.block_size)) == 0 for b in bases[:-1])
    if isinstance(first, Int8EmulationLinear):
        return all(b.threshold == first.threshold for b in bases)
    return False


# --- quantized tables (embedding / lm_head) ---------------------------------------------------------------


def quantize_table(weight: torch.Tensor, kind: str, *, accuracy_level: int = LM_HEAD_ACCURACY_LEVEL,
                   symmetric: bool = False) -> NBitsLinear:
    """Round-to-nearest blocks of an embedding / lm_head table ``[vocab, hidden]`` as the fast path stores them.

    The same :class:`NBitsLinear` serves both uses: MatMulNBits reads it as the lm_head, and
    GatherBlockQuantized reads its rows (``qweight`` reshaped to ``[vocab, k_blocks * block_bytes]``) as
    the embedding; :meth:`NBitsLinear.dequantized_weight` is the table both compute with.
    """
    bits = {"int4": 4, "int8": 8}.get(kind)
    if bits is None:
        raise ExportError(f"fast path: quantization {kind!r} for embeddings / lm_head: choose int4 or int8")
    return NBitsLinear.from_float(weight, bits=bits, block_size=EMBEDDING_BLOCK, accuracy_level=accuracy_level,
                                  symmetric=symmetric)


# --- model structure --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    scaling: float


def _check_supported(model: nn.Module) -> _Geometry:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FastPathUnsupported(f"fast path: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                                  "use export.graph.export_decoder")
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, attr):
            raise FastPathUnsupported(f"fast path: {type(model).__name__} has no model.{attr}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise FastPathUnsupported(f"fast path: hidden_act {config.hidden_act!r} (only silu is built)")
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise FastPathUnsupported("fast path: mistral with a sliding window is not built (GQA local_window_size "
                                  "semantics unverified)")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise FastPathUnsupported("fast path: qwen2 with use_sliding_window is not built")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise FastPathUnsupported(f"fast path: layer types {sorted(set(layer_types))} (only full_attention)")
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise FastPathUnsupported(f"fast path: rope_type {rope_type!r} depends on the sequence length "
                                  f"(built: {_STATIC_ROPE_TYPES})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if 2 * int(inner.rotary_emb.inv_freq.numel()) != head_dim:
        raise FastPathUnsupported(f"fast path: partial rotary ({2 * inner.rotary_emb.inv_freq.numel()} of {head_dim} "
                                  "dims) is not built")
    if not isinstance(inner.embed_tokens, nn.Embedding):
        raise FastPathUnsupported(f"fast path: embed_tokens is {type(inner.embed_tokens).__name__}, not nn.Embedding")
    attn = inner.layers[0].self_attn
    return _Geometry(num_layers=config.num_hidden_layers, num_heads=heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     hidden=config.hidden_size, vocab=config.vocab_size,
                     scaling=float(getattr(attn, "scaling", head_dim ** -0.5)))


def _float_type(model: nn.Module) -> np.dtype:
    dtype = model.model.embed_tokens.weight.dtype
    if dtype == torch.float32:
        return np.dtype(np.float32)
    if dtype == torch.float16:
        return np.dtype(np.float16)
    raise FastPathUnsupported(f"fast path: {dtype} models are not built (fp32 or fp16)")


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    embed = model.model.embed_tokens.weight
    return type(head) is nn.Linear and head.weight.data_ptr() == embed.data_ptr() and head.bias is None


# --- the graph ----------------------------------------------------------------------------------------------


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


# attention_mask ─> CumSum ─> Sub(1) ─> Where(mask == 0, 1) ─> Slice(last seq) = positions [B, S]
#                ─> Where(mask == 0, min, 0) ─> Unsqueeze ─> Expand [B, 1, S, T] = attention_bias
#                ─> Shape[1] = T ─> Cast(int32) = total_sequence_length ─> Sub(1) ─> Expand [B] = seqlens_k
# input_ids ─> Shape[1] = S ─> Cast(int32) ─> Expand [B] = query_seqlens
def _mask_subgraph(g: _Graph, mask_bias: float) -> tuple[str, str, str, str, str]:
    """``(positions, attention_bias, seqlens_k, total_sequence_length, query_seqlens)`` from the inputs.

    ``query_seqlens`` (every row: all ``S`` query rows valid) is what lets GQA take a multi-token step with a
    past for a batch > 1 (without it onnxruntime requires batch 1 there); it changes nothing else.
    """
    scope = "model/attn_mask"
    one = g.const([1])
    ids_shape = g.op1("Shape", ["input_ids"], scope)
    mask_shape = g.op1("Shape", ["attention_mask"], scope)
    batch = g.op1("Slice", [ids_shape, g.const([0]), one], scope)
    seq = g.op1("Slice", [ids_shape, one, g.const([2])], scope)
    total = g.op1("Slice", [mask_shape, one, g.const([2])], scope)
    is_pad = g.op1("Equal", ["attention_mask", g.const(0)], scope)
    cumsum = g.op1("CumSum", ["attention_mask", g.const(1)], scope)
    positions = g.op1("Where", [is_pad, g.const(1), g.op1("Sub", [cumsum, g.const(1)], scope)], scope)
    positions = g.op1("Slice", [positions, g.op1("Neg", [seq], scope), g.const([_INT64_MAX]), one], scope)
    bias = g.op1("Where", [is_pad, g.const(mask_bias, g.float_type), g.const(0.0, g.float_type)], scope)
    bias = g.op1("Unsqueeze", [bias, g.const([1, 2])], scope)
    bias = g.op1("Expand", [bias, g.op1("Concat", [batch, one, seq, total], scope, axis=0)], scope)
    total32 = g.op1("Cast", [g.op1("Squeeze", [total, g.const([0])], scope)], scope, to=TensorProto.INT32)
    seqlens = g.op1("Expand", [g.op1("Sub", [total32, g.const(1, np.int32)], scope), batch], scope)
    query_seqlens = g.op1("Expand", [g.op1("Cast", [seq], scope, to=TensorProto.INT32), batch], scope)
    return positions, bias, seqlens, total32, query_seqlens


def _rope_tables(model: nn.Module, g: _Graph) -> tuple[str, str]:
    """``cos_cache`` / ``sin_cache`` [max_positions, head_dim / 2], computed as transformers computes them."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(rotary, "max_seq_len_cached")
    freqs = torch.arange(int(positions), dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    return g.floats("cos_cache", cos), g.floats("sin_cache", sin)


def _norm_weight(g: _Graph, module: nn.Module, path: str) -> tuple[str, float]:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None or not hasattr(module, "weight"):
        raise FastPathUnsupported(f"fast path: {path} ({type(module).__name__}) is not an RMSNorm")
    return g.floats(f"{path}.weight", module.weight), float(eps)


def _emit_embedding(g: _Graph, model: nn.Module, tables: dict[str, NBitsLinear]) -> str:
    scope = "model/embed_tokens"
    table = tables.get("embed")
    if table is None:
        weight = g.floats("model.embed_tokens.weight", model.model.embed_tokens.weight)
        return g.op1("Gather", [weight, "input_ids"], scope)
    # GatherBlockQuantized reads MatMulNBits' blocks as rows [V, k_blocks * block_bytes] (shared with lm_head
    # when they are tied): Reshape ─> GatherBlockQuantized(scales, zero_points)
    prefix = "lm_head" if tables.get("lm_head") is table else "model.embed_tokens"
    q, s, z = _table_initializers(g, table, prefix)
    rows = g.op1("Reshape", [q, g.const([table.out_features, -1])], scope)
    out = g.op1("GatherBlockQuantized", [rows, "input_ids", s] + ([z] if z else []), scope, domain=MSFT,
                bits=int(table.bits), block_size=int(table.block_size), gather_axis=0, quantize_axis=1)
    if table.in_features % table.block_size:
        out = g.op1("Slice", [out, g.const([0]), g.const([table.in_features]), g.const([-1])], scope)
    return out


def _table_initializers(g: _Graph, table: NBitsLinear, prefix: str) -> tuple[str, str, str | None]:
    """Initializer names of a quantized table, emitted on first use (the embedding and lm_head share them);
    no zero points when they all equal the ops' default ``2**(bits-1)`` (symmetric tables)."""
    zero_points = None if _default_zero_points(table) else f"{prefix}.zero_points"
    names = (f"{prefix}.qweight", f"{prefix}.scales", zero_points)
    if not g.has(names[0]):
        g.initializer(names[0], table.qweight)
        if g.float_type == np.float32:
            g.initializer(names[1], table.scales)
        else:
            g.floats(names[1], table.scales)
        if zero_points:
            g.initializer(zero_points, table.zero_points)
    return names


# x ─> Reshape[-1, H] ─> Gemm(W [V, H], transB=1) ─> Reshape[B, S, V]   (tied fp32: one copy of the table)
# x ─> MatMulNBits(shared qweight) / the lm_head module's own nodes      (otherwise)
def _emit_lm_head(g: _Graph, emitter: _Emitter, model: nn.Module, x: str, tables: dict[str, NBitsLinear],
                  geometry: _Geometry) -> str:
    scope = "lm_head"
    table = tables.get("lm_head")
    if table is not None:
        q, s, z = _table_initializers(g, table, "lm_head")
        return g.op1("MatMulNBits", [x, q, s] + ([z] if z else []), scope, domain=MSFT, K=int(table.in_features),
                     N=int(table.out_features), bits=int(table.bits), block_size=int(table.block_size),
                     accuracy_level=int(table.accuracy_level))
    if _tied(model) and g.has("model.embed_tokens.weight"):
        lead = g.op1("Slice", [g.op1("Shape", [x], scope), g.const([0]), g.const([-1])], scope)
        x2 = g.op1("Reshape", [x, g.const([-1, geometry.hidden])], scope)
        y = g.op1("Gemm", [x2, "model.embed_tokens.weight"], scope, transB=1)
        return g.op1("Reshape", [y, g.op1("Concat", [lead, g.const([geometry.vocab])], scope, axis=0)], scope)
    return emitter.linear(model.lm_head, x, "lm_head")


def _emit_graph(model: nn.Module, g: _Graph, geometry: _Geometry, *, fused_qkv: bool, fused_gate_up: bool,
                tables: dict[str, NBitsLinear], adapter_branches: dict[str, _Branch]) -> None:
    emitter = _Emitter(g, adapter_branches)
    inner = model.model
    float_type = g.float_type
    mask_bias = float(np.finfo(np.float32).min) if float_type == np.float32 else _FP16_MASK_BIAS
    positions, bias, seqlens, total, query_seqlens = _mask_subgraph(g, mask_bias)
    cos, sin = _rope_tables(model, g)
    hidden = _emit_embedding(g, model, tables)
    residual = None
    x = None
    for i, layer in enumerate(inner.layers):
        path = f"model.layers.{i}"
        gamma, eps = _norm_weight(g, layer.input_layernorm, f"{path}.input_layernorm")
        if residual is None:
            x = g.op1("SimplifiedLayerNormalization", [hidden, gamma], f"{_scope(path)}/input_layernorm",
                      epsilon=eps, axis=-1, stash_type=1)
            residual = hidden
        else:
            x, residual = _skip_norm(g, hidden, residual, gamma, eps, f"{path}.input_layernorm")
        attn = layer.self_attn
        apath = f"{path}.self_attn"
        q, k, v = emitter.group([(f"{apath}.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")], x,
                                f"{apath}.qkv_proj", fused_qkv)
        ascope = _scope(apath)
        q = g.op1("RotaryEmbedding", [q, positions, cos, sin], ascope, domain=MSFT)
        k = g.op1("RotaryEmbedding", [k, positions, cos, sin], ascope, domain=MSFT)
        out = g.op("GroupQueryAttention",
                   [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, "", "", "",
                    bias, "", "", "", "", "", query_seqlens],
                   ascope, outputs=[f"{ascope}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                   domain=MSFT, num_heads=geometry.num_heads, kv_num_heads=geometry.num_kv_heads,
                   scale=geometry.scaling, do_rotary=0, local_window_size=-1)[0]
        attn_out = emitter.linear(attn.o_proj, out, f"{apath}.o_proj")
        gamma, eps = _norm_weight(g, layer.post_attention_layernorm, f"{path}.post_attention_layernorm")
        x, residual = _skip_norm(g, attn_out, residual, gamma, eps, f"{path}.post_attention_layernorm")
        mlp = layer.mlp
        mpath = f"{path}.mlp"
        gate, up = emitter.group([(f"{mpath}.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")], x,
                                 f"{mpath}.gate_up_proj", fused_gate_up)
        mscope = _scope(mpath)
        act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate], f"{mscope}/act_fn")], f"{mscope}/act_fn")
        hidden = emitter.linear(mlp.down_proj, g.op1("Mul", [act, up], mscope), f"{mpath}.down_proj")
    gamma, eps = _norm_weight(g, inner.norm, "model.norm")
    x, _ = _skip_norm(g, hidden, residual, gamma, eps, "model.norm")
    logits = _emit_lm_head(g, emitter, model, x, tables, geometry)
    if float_type != np.float32:
        g.op("Cast", [logits], "lm_head", outputs=["logits"], to=TensorProto.FLOAT)
    else:
        producer = next(n for n in reversed(g.nodes) if logits in n.output)
        producer.output[list(producer.output).index(logits)] = "logits"



# hidden ─┐
# residual ─> SkipSimplifiedLayerNormalization(gamma) ─> normed, residual + hidden (output 3)
def _skip_norm(g: _Graph, hidden: str, residual: str, gamma: str, eps: float, path: str) -> tuple[str, str]:
    out = g.op("SkipSimplifiedLayerNormalization", [hidden, residual, gamma], _scope(path), outputs=4, domain=MSFT,
               epsilon=eps)
    node = g.nodes[-1]
    del node.output[:]
    node.output.extend([out[0], "", "", out[3]])
    return out[0], out[3]


def build_decoder(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    filename: str = "model.onnx",
    fused_qkv: bool = True,
    fused_gate_up: bool = True,
    quantize_embeddings: QuantizedTable = None,
    quantize_lm_head: QuantizedTable = None,
    table_accuracy_level: int = LM_HEAD_ACCURACY_LEVEL,
    table_symmetric: bool = False,
    check: bool = True,
) -> ExportResult:
    """Build the KV-cache decoding graph of a Llama-family twin directly (no tracing).

    Args:
        model: a transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` after
            ``export.api.convert_for_export`` (linears are ``nn.Linear``, :class:`NBitsLinear`,
            :class:`Bnb4Linear`, :class:`Int8EmulationLinear` or :class:`LowRankBranch` around one of them).
            fp32 or fp16 (an fp16 model gives fp16 weights, activations and KV cache, fp32 logits).
        output_dir: folder to write ``filename`` and ``filename.data`` into (created if missing).
        opset: default-domain opset (``com.microsoft`` ops are version 1).
        filename: the model file name.
        fused_qkv: one q/k/v base node (split afterwards) when the three bases are compatible.
        fused_gate_up: likewise for gate/up.
        quantize_embeddings: ``"int4"``/``"int8"``: the embedding table as GatherBlockQuantized blocks
            (round-to-nearest, block 32; lossy: compare with the lossy tier).
        quantize_lm_head: ``"int4"``/``"int8"``: an ``nn.Linear`` lm_head as MatMulNBits (accuracy_level 4).
            Tied embeddings quantized the same way share one set of initializers.
        table_accuracy_level: MatMulNBits ``accuracy_level`` of a quantized lm_head (0: exact fp32 compute
            against :func:`quantize_table`'s dequantized table).
        table_symmetric: symmetric round-to-nearest tables (zero point ``2**(bits-1)``, left out of the graph),
            as the genai builder quantizes them.
        check: run ``onnx.checker`` on the written file.

    Returns:
        An :class:`ExportResult` (``export.graph``'s).

    Raises:
        FastPathUnsupported: the architecture or a module is outside the fast path (fall back to
            ``export.graph.export_decoder``).
        ExportError: the checker rejected the graph.
    """
    started = time.perf_counter()
    geometry = _check_supported(model)
    float_type = _float_type(model)
    onnx_float = helper.np_dtype_to_tensor_dtype(float_type)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tables: dict[str, NBitsLinear] = {}
    embed_weight = model.model.embed_tokens.weight
    if quantize_lm_head is not None:
        if type(model.lm_head) is not nn.Linear:
            raise ExportError(f"fast path: quantize_lm_head needs an nn.Linear lm_head, got {type(model.lm_head).__name__}")
        tables["lm_head"] = quantize_table(model.lm_head.weight, quantize_lm_head, accuracy_level=table_accuracy_level,
                                           symmetric=table_symmetric)
    if quantize_embeddings is not None:
        if _tied(model) and quantize_lm_head == quantize_embeddings:
            tables["embed"] = tables["lm_head"]
        else:
            tables["embed"] = quantize_table(embed_weight, quantize_embeddings, accuracy_level=table_accuracy_level,
                                             symmetric=table_symmetric)

    lora_names = list(adapter_input_names(model))
    branches: dict[str, _Branch] = {}
    adapter_inputs: list[onnx.ValueInfoProto] = []
    runtime = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankBranch) and m.factors_as_inputs]
    for j, (name, module) in enumerate(runtime):
        branches[name] = _Branch(f"{name}.lora_A", f"{name}.lora_B")
        adapter_inputs += [_value_info(f"{name}.lora_A", TensorProto.FLOAT, [module.in_features, f"rank_{j}"]),
                           _value_info(f"{name}.lora_B", TensorProto.FLOAT, [f"rank_{j}", module.out_features])]

    staging = Path(tempfile.mkdtemp(prefix=".fastpath-", dir=output_dir))
    data_name = f"{filename}.data"
    try:
        weights = _WeightFile(staging / data_name)
        try:
            g = _Graph(weights, float_type)
            with torch.no_grad():
                _emit_graph(model, g, geometry, fused_qkv=fused_qkv, fused_gate_up=fused_gate_up, tables=tables,
                            adapter_branches=branches)
        finally:
            weights.close()
        kv = [geometry.num_kv_heads, geometry.head_dim]
        past = [_value_info(f"past_key_values.{i}.{kind}", onnx_float, ["batch", kv[0], "past_seq", kv[1]])
                for i in range(geometry.num_layers) for kind in ("key", "value")]
        present = [_value_info(f"present.{i}.{kind}", onnx_float, ["batch", kv[0], "total_seq", kv[1]])
                   for i in range(geometry.num_layers) for kind in ("key", "value")]
        inputs = [_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  _value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]), *past, *adapter_inputs]
        outputs = [_value_info("logits", TensorProto.FLOAT, ["batch", "seq", geometry.vocab]), *present]
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MSFT, 1)],
                                  producer_name="adalora_deploy.fastpath")
        proto.ir_version = min(proto.ir_version, 10)
        # every present tensor comes from GroupQueryAttention: runners may bind past and present to one
        # preallocated buffer (export.runtime.DecoderSession.generate_greedy, onnxruntime-genai)
        helper.set_model_props(proto, {KV_SHARE_BUFFER_METADATA: "1", "adalora_deploy.builder": "fastpath"})
        staged = staging / filename
        onnx.save_model(proto, str(staged))
        if check:
            _register_checker_schemas()
            try:
                onnx.checker.check_model(str(staged))
            except onnx.checker.ValidationError as error:
                raise ExportError(f"onnx.checker rejected the fast-path graph: {error}") from error
        data_path = output_dir / data_name
        if (staging / data_name).stat().st_size:
            os.replace(staging / data_name, data_path)
        else:
            data_path = None
            if (output_dir / data_name).exists():
                (output_dir / data_name).unlink()
        model_path = output_dir / filename
        os.replace(staged, model_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    counts = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                                 for n in proto.graph.node)
    result = ExportResult(
        model_path=model_path, external_data_path=data_path,
        input_names=tuple(i.name for i in proto.graph.input), output_names=tuple(o.name for o in proto.graph.output),
        adapter_input_names=tuple(lora_names), op_counts=MappingProxyType(dict(sorted(counts.items()))), opset=opset,
        num_layers=geometry.num_layers, num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
    )
    logger.info("fast path wrote %s (%d nodes) in %.1f s", model_path, len(proto.graph.node),
                time.perf_counter() - started)
    return result


def _register_checker_schemas() -> None:
    """``SimplifiedLayerNormalization`` lives in onnxruntime's default-domain contrib set, unknown to onnx: give
    the checker a schema for it (idempotent). ``com.microsoft`` nodes are not validated by the checker."""
    if onnx.defs.has("SimplifiedLayerNormalization", ""):
        return
    F = onnx.defs.OpSchema.FormalParameter
    O = onnx.defs.OpSchema.FormalParameterOption
    A = onnx.defs.OpSchema.Attribute
    T = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[F("X", "T"), F("scale", "V")],
        outputs=[F("Y", "V"), F("inv_std_var", "U", param_option=O.Optional)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("U", ["tensor(float)", "tensor(float16)"], ""),
                          ("V", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[A("axis", helper.make_attribute("axis", -1)), A("epsilon", helper.make_attribute("epsilon", 1e-5)),
                    A("stash_type", helper.make_attribute("stash_type", 1))],
    )
    onnx.defs.register_schema(schema)
