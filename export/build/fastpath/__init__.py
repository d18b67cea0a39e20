"""Direct ONNX graph builder ("fast path") for pre-norm GQA decoders (:data:`FAMILIES`): the build entry point.

Instead of tracing the model with ``torch.onnx.export(dynamo=True)`` (minutes, an unfused graph), this
module walks the export twin (a transformers causal LM after ``export.build.convert.convert_for_export``) and emits
onnxruntime's fused contrib ops node by node, streaming each weight to ``model.onnx.data`` as it goes::

    input_ids ─> Gather / GatherBlockQuantized (embed_tokens) ─> Reshape [B * S, H] ─> h   (tokens as rows)
    attention_mask ─> positions = cumsum - 1 (pads 1), last seq    ┐ shared by all layers
                   ─> bias [B,1,S,T] = mask ? 0 : min              │
                   ─> seqlens_k = T - 1 (every row), total = T     ┘
    per layer i:
      h ─> [Skip]SimplifiedLayerNormalization ─> x
      x ─> q/k/v projection (fused when the bases allow) [+ one LoRA branch] ─> Reshape [B, S, -1] ─> packed qkv
      GroupQueryAttention(qkv, past_i, seqlens_k, total, cos, sin, position_ids=positions, attention_bias=bias,
                          do_rotary=1) ─> Reshape [B * S, heads * D] ─> attn, present_i
        (q/k norms (Qwen3, Gemma3), or a table GQA refuses: ─> Split ─> [+ LoRA] ─> q, k, v ─> [q/k norms]
         ─> RotaryEmbedding(positions) on q and k ─> GroupQueryAttention(q, k, v, ..., do_rotary=0); per-member
         LoRA branches (adapter inputs): q, k, v split, rotated by GQA)
      attn ─> o_proj ─> SkipSimplifiedLayerNormalization(+ residual) ─> x
      x ─> gate/up projection (fused) [+ one LoRA branch] ─> Split ─> [+ LoRA] ─> Sigmoid/Mul/Mul ─> down_proj
    SkipSimplifiedLayerNormalization(final norm) ─> lm_head (MatMul / Gemm / MatMulNBits) ─> Reshape [B, S, V]
      ─> logits

Why rows: a LoRA branch's up-projection and its sum with the base output are then one Gemm (C = the base output;
Gemm is 2-D), one node a branch fewer, for two Reshapes a layer around GroupQueryAttention (which reads and
writes [B, S, .]): SmolLM2 with 115 branches, 701 -> 649 nodes, logits bitwise equal, +2-4% decode. What a
branch costs a decode step is mostly the bytes of its factors, read again every token (measured on SmolLM2 at 2
threads: a node's dispatch is 0.3-0.4 us; the same graph with each branch cut to rank 1, same nodes, 40% fewer
bytes read, decoded +5-9%; without the MLP branches +14-18%; without any, ~1.3x; docs/benchmarks.md).

The graph keeps the interface of :mod:`export.build.graph` exactly (same input and output names, dtypes and
axes, adapter inputs after the past tensors) and computes the same function as
:class:`export.build.graph.DecoderWrapper`, including left-padded batches.

Left padding and GroupQueryAttention: GQA places a row's new keys at ``seqlens_k[b] + 1 - seq`` and applies
its causal mask from there, i.e. it assumes right padding. Here every row claims the full length
(``seqlens_k = total_seq - 1``), which matches the left-padded layout (all rows end at ``total_seq``), and
the pad keys are masked by GQA's ``attention_bias`` input. Rotary embedding reads the per-row positions
(``cumsum(mask) - 1``): GQA's own rotary (``do_rotary``) derives positions from ``seqlens_k`` (right padding)
unless given ``position_ids``, which onnxruntime 1.32's CPU kernel reads per element when ``query_seqlens`` is
given, as here (:mod:`.family` says what was measured; families it cannot serve keep ``RotaryEmbedding`` nodes
before GQA). So DecoderSession needs no change to be correct. Because every present
tensor comes from GQA, a runner may also bind ``past`` and ``present`` to one preallocated buffer (GQA then
appends in place): the graph says so in its metadata
(:data:`~adalora_deploy.export.contract.KV_SHARE_BUFFER_METADATA`), which ``DecoderSession.generate_greedy`` and onnxruntime-genai (``past_present_share_buffer``) use.

Split as onnxruntime-genai's builder is split::

    graph.py    weights (the external data file) and graph bookkeeping (nodes, names, constants)
    linear.py   linear lowering (each twin's lowering(), fused siblings, LoRA branches: no kind named here)
                and quantized tables
    family.py   the decoder every family shares, with one hook per architectural difference
    llama.py, mistral.py, qwen2.py, qwen3.py, gemma.py, gemma2.py, gemma3.py, phi3.py
                one module per architecture family (a subclass naming its model types, overriding hooks)
    __init__    this entry point: pick the family, build, write, check

A branch's products are named ``/<m>/MatMul_0`` and ``/<m>/Gemm_0`` (fp16: ``/<m>/MatMul_1`` + ``/<m>/Add_0``),
the base ``/<m>/base/...`` or, when the projections are fused, ``/<...>/qkv_proj/...`` and
``/<...>/gate_up_proj/...``. Fused siblings with two or more branches whose factors are initializers share one
branch (``.linear.LinearEmitter.group``) in the fused scope, reading ``<...>.qkv_proj.lora_A`` / ``.lora_B``
(``gate_up_proj`` alike); ``export.api._adapter_matmuls`` counts the products of both forms.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from adalora_deploy.errors import ExportError

from ...contract import (ATTENTION_MASK, BUILDER_METADATA, INPUT_IDS, KV_SHARE_BUFFER_METADATA, LOGITS, MODEL_FILE,
                         adapter_input_name, kv_names)
from ..graph import DEFAULT_OPSET, ExportResult, adapter_input_names
from ..modules import LowRankBranch, NBitsLinear
from .family import DecoderFamily, float_type, tied
from .graph import FastPathUnsupported, Graph, WeightFile, register_checker_schemas, value_info
from .linear import LM_HEAD_ACCURACY_LEVEL, MSFT, Branch, QuantizedTable, quantize_table
from .gemma import GemmaFamily
from .gemma2 import Gemma2Family
from .gemma3 import Gemma3Family
from .llama import LlamaFamily
from .mistral import MistralFamily
from .phi3 import Phi3Family
from .qwen2 import Qwen2Family
from .qwen3 import Qwen3Family

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "FastPathUnsupported",
    "build_decoder",
    "quantize_table",
]

logger = logging.getLogger(__name__)

FAMILIES: tuple[type[DecoderFamily], ...] = (LlamaFamily, MistralFamily, Qwen2Family, Qwen3Family, GemmaFamily,
                                             Gemma2Family, Gemma3Family, Phi3Family)
"""Architecture families the fast path builds; a new family is a :class:`DecoderFamily` subclass added here."""
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)
"""``config.model_type`` values the fast path builds; anything else raises :class:`FastPathUnsupported`."""


def family_for(model: nn.Module) -> DecoderFamily:
    """The family that builds ``model``."""
    model_type = getattr(model.config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family()
    raise FastPathUnsupported(f"fast path: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                              "use export.build.graph.export_decoder")


def build_decoder(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    filename: str = MODEL_FILE,
    fused_qkv: bool = True,
    fused_gate_up: bool = True,
    quantize_embeddings: QuantizedTable = None,
    quantize_lm_head: QuantizedTable = None,
    table_accuracy_level: int = LM_HEAD_ACCURACY_LEVEL,
    table_symmetric: bool = False,
    check: bool = True,
) -> ExportResult:
    """Build the KV-cache decoding graph of a twin of one of :data:`FAMILIES` directly (no tracing).

    Args:
        model: a transformers causal LM of a ``model_type`` in :data:`SUPPORTED_MODEL_TYPES` after
            ``export.build.convert.convert_for_export`` (linears are ``nn.Linear``, :class:`NBitsLinear`,
            a base kind's twin with a ``lowering()`` (``export.build.kinds``) or :class:`LowRankBranch` around
            one of them).
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
        An :class:`ExportResult` (``export.build.graph``'s).

    Raises:
        FastPathUnsupported: the architecture or a module is outside the fast path (fall back to
            ``export.build.graph.export_decoder``).
        ExportError: the checker rejected the graph.
    """
    started = time.perf_counter()
    family = family_for(model)
    geometry = family.geometry(model)
    graph_float = float_type(model)
    onnx_float = helper.np_dtype_to_tensor_dtype(graph_float)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tables: dict[str, NBitsLinear] = {}
    embed_weight = model.model.embed_tokens.weight
    head = model.lm_head
    if isinstance(head, NBitsLinear) and head.perm is None and head.bias is None:
        # a table quantized in the base (quantize --tables): the lm_head's blocks are the graph's table, and an
        # embedding holding exactly their dequantized rows (a tied one) reads the same bytes
        tables["lm_head"] = head
        if embed_weight.dtype == torch.float32 and torch.equal(embed_weight, head.dequantized_weight()):
            tables["embed"] = head
    if quantize_lm_head is not None:
        if type(model.lm_head) is not nn.Linear:
            raise ExportError(f"fast path: quantize_lm_head needs an nn.Linear lm_head, got {type(model.lm_head).__name__}")
        tables["lm_head"] = quantize_table(model.lm_head.weight, quantize_lm_head, accuracy_level=table_accuracy_level,
                                           symmetric=table_symmetric)
    if quantize_embeddings is not None:
        if tied(model) and quantize_lm_head == quantize_embeddings:
            tables["embed"] = tables["lm_head"]
        else:
            tables["embed"] = quantize_table(embed_weight, quantize_embeddings, accuracy_level=table_accuracy_level,
                                             symmetric=table_symmetric)

    lora_names = list(adapter_input_names(model))
    branches: dict[str, Branch] = {}
    adapter_inputs: list[onnx.ValueInfoProto] = []
    runtime = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankBranch) and m.factors_as_inputs]
    for j, (name, module) in enumerate(runtime):
        branch = Branch(adapter_input_name(name, "lora_A"), adapter_input_name(name, "lora_B"))
        branches[name] = branch
        adapter_inputs += [value_info(branch.lora_A, TensorProto.FLOAT, [module.in_features, f"rank_{j}"]),
                           value_info(branch.lora_B, TensorProto.FLOAT, [f"rank_{j}", module.out_features])]

    staging = Path(tempfile.mkdtemp(prefix=".fastpath-", dir=output_dir))
    data_name = f"{filename}.data"
    try:
        weights = WeightFile(staging / data_name)
        try:
            g = Graph(weights, graph_float)
            with torch.no_grad():
                family.emit(model, g, geometry, fused_qkv=fused_qkv, fused_gate_up=fused_gate_up, tables=tables,
                            adapter_branches=branches)
        finally:
            weights.close()
        kv = geometry.kv
        past_names, present_names = kv_names(kv.num_layers)
        past = [value_info(name, onnx_float, ["batch", kv.num_kv_heads, "past_seq", kv.head_dim]) for name in past_names]
        present = [value_info(name, onnx_float, ["batch", kv.num_kv_heads, "total_seq", kv.head_dim])
                   for name in present_names]
        inputs = [value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
                  value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"]), *past, *adapter_inputs]
        outputs = [value_info(LOGITS, TensorProto.FLOAT, ["batch", "seq", kv.vocab]), *present]
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MSFT, 1)],
                                  producer_name="adalora_deploy.fastpath")
        proto.ir_version = min(proto.ir_version, 10)
        # every present tensor comes from GroupQueryAttention: runners may bind past and present to one
        # preallocated buffer (export.runtime.session.DecoderSession.generate_greedy, onnxruntime-genai)
        helper.set_model_props(proto, {KV_SHARE_BUFFER_METADATA: "1", BUILDER_METADATA: "fastpath"})
        staged = staging / filename
        onnx.save_model(proto, str(staged))
        if check:
            register_checker_schemas()
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
        num_layers=kv.num_layers, num_kv_heads=kv.num_kv_heads, head_dim=kv.head_dim,
    )
    logger.info("fast path wrote %s (%d nodes) in %.1f s", model_path, len(proto.graph.node),
                time.perf_counter() - started)
    return result

