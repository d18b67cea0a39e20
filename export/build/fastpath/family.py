"""The decoder every fast-path architecture family shares, with one hook per place where families differ.

:class:`DecoderFamily` emits a pre-norm decoder (RMSNorm, rotary embedding, GroupQueryAttention, gated MLP)
node by node; a family (:mod:`.llama`, :mod:`.qwen2`) is a subclass that names its ``model_type`` values and
overrides only the hooks its architecture needs::

    hook                      default (Llama)                         overridden by, e.g.
    check(model)              refuse what the base class cannot build  Mistral/Qwen2 sliding windows
    qkv(attn, path)           q_proj, k_proj, v_proj (fused here when  Phi3: one qkv_proj module
                              their bases allow)
    qk_norm(g, attn, q, k)    none                                    Qwen3, Gemma3: RMSNorm per head
    embedding_scale(config)   none                                    Gemma: x sqrt(hidden)
    attention_softcap(config) 0 (GQA's softcap attribute left out)    Gemma2
    final_softcap(config)     none                                    Gemma2: c tanh(logits / c)
    local_window_size(i)      -1 (full attention)                     Mistral, Gemma2/3 sliding layers

Attention biases need no hook: the linear lowering (:mod:`.linear`) adds any projection's bias (Qwen2's q/k/v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from ...contract import ATTENTION_MASK, INPUT_IDS, LOGITS, KVGeometry, kv_names
from ..modules import NBitsLinear
from .graph import FastPathUnsupported, Graph, scope_of
from .linear import MSFT, Branch, LinearEmitter, table_initializers

__all__ = ["DecoderFamily", "Geometry"]

_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE types whose inverse frequencies do not depend on the sequence length (a fixed cos/sin table)."""
_INT64_MAX = np.iinfo(np.int64).max
_FP16_MASK_BIAS = -1e4
"""Additive mask for pad keys in fp16 graphs: large enough that exp() underflows to 0, small enough that a fully
masked (pad) query row stays finite (finfo(fp16).min plus a negative score overflows to -inf, and an all -inf
row would put NaN into the pad positions' keys and values). fp32 graphs use finfo(fp32).min, as transformers."""


@dataclass(frozen=True)
class Geometry:
    """The graph's KV geometry (:class:`~adalora_deploy.export.contract.KVGeometry`) and the attention scale."""

    kv: KVGeometry
    scaling: float


class DecoderFamily:
    """A pre-norm decoder-only transformer as onnxruntime's fused ops; subclasses override the hooks."""

    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values this family builds."""

    # --- hooks --------------------------------------------------------------------------------------------

    def check(self, model: nn.Module) -> None:
        """Raise :class:`FastPathUnsupported` for a model of this family that the graph would compute wrongly."""
        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise FastPathUnsupported(f"fast path: hidden_act {config.hidden_act!r} (only silu is built)")
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise FastPathUnsupported(f"fast path: layer types {sorted(set(layer_types))} (only full_attention)")

    def qkv(self, attn: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
        """The q, k, v projections (module path, module), fused into one base node when compatible."""
        return [(f"{path}.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]

    def qk_norm(self, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
        """Queries and keys after any per-head normalization, before rotary embedding (none here)."""
        return q, k

    def embedding_scale(self, config: Any) -> float | None:
        """A factor the embedding output is multiplied by (none here)."""
        return None

    def attention_softcap(self, config: Any) -> float:
        """GroupQueryAttention's ``softcap`` on attention scores (0: none)."""
        return 0.0

    def final_softcap(self, config: Any) -> float | None:
        """``c`` of ``c tanh(logits / c)`` on the final logits (none here)."""
        return None

    def local_window_size(self, config: Any, layer: int) -> int:
        """GroupQueryAttention's ``local_window_size`` for one layer (-1: full attention)."""
        return -1

    # --- the decoder --------------------------------------------------------------------------------------

    def geometry(self, model: nn.Module) -> Geometry:
        """Check the structure every family shares and read its geometry."""
        self.check(model)
        config = model.config
        inner = getattr(model, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if inner is None or not hasattr(inner, attr):
                raise FastPathUnsupported(f"fast path: {type(model).__name__} has no model.{attr}")
        rope_type = getattr(inner.rotary_emb, "rope_type", "default")
        if rope_type not in _STATIC_ROPE_TYPES:
            raise FastPathUnsupported(f"fast path: rope_type {rope_type!r} depends on the sequence length "
                                      f"(built: {_STATIC_ROPE_TYPES})")
        kv = KVGeometry.of(config)
        if 2 * int(inner.rotary_emb.inv_freq.numel()) != kv.head_dim:
            raise FastPathUnsupported(f"fast path: partial rotary ({2 * inner.rotary_emb.inv_freq.numel()} of "
                                      f"{kv.head_dim} dims) is not built")
        if not isinstance(inner.embed_tokens, nn.Embedding):
            raise FastPathUnsupported(f"fast path: embed_tokens is {type(inner.embed_tokens).__name__}, not nn.Embedding")
        attn = inner.layers[0].self_attn
        return Geometry(kv=kv, scaling=float(getattr(attn, "scaling", kv.head_dim ** -0.5)))

    def emit(self, model: nn.Module, g: Graph, geometry: Geometry, *, fused_qkv: bool, fused_gate_up: bool,
             tables: dict[str, NBitsLinear], adapter_branches: dict[str, Branch]) -> None:
        """Every node of the decoder into ``g``; the last one writes :data:`~...contract.LOGITS`."""
        emitter = LinearEmitter(g, adapter_branches)
        inner, config = model.model, model.config
        mask_bias = float(np.finfo(np.float32).min) if g.float_type == np.float32 else _FP16_MASK_BIAS
        positions, bias, seqlens, total, query_seqlens = _mask_subgraph(g, mask_bias)
        cos, sin = _rope_tables(model, g)
        hidden = _emit_embedding(g, model, tables)
        scale = self.embedding_scale(config)
        if scale is not None:
            hidden = g.op1("Mul", [hidden, g.const(scale, g.float_type)], "model/embed_tokens")
        past, present = kv_names(geometry.kv.num_layers)
        softcap = self.attention_softcap(config)
        residual = None
        x = None
        for i, layer in enumerate(inner.layers):
            path = f"model.layers.{i}"
            gamma, eps = _norm_weight(g, layer.input_layernorm, f"{path}.input_layernorm")
            if residual is None:
                x = g.op1("SimplifiedLayerNormalization", [hidden, gamma], f"{scope_of(path)}/input_layernorm",
                          epsilon=eps, axis=-1, stash_type=1)
                residual = hidden
            else:
                x, residual = _skip_norm(g, hidden, residual, gamma, eps, f"{path}.input_layernorm")
            attn = layer.self_attn
            apath = f"{path}.self_attn"
            q, k, v = emitter.group(self.qkv(attn, apath), x, f"{apath}.qkv_proj", fused_qkv)
            q, k = self.qk_norm(g, attn, q, k, apath)
            ascope = scope_of(apath)
            q = g.op1("RotaryEmbedding", [q, positions, cos, sin], ascope, domain=MSFT)
            k = g.op1("RotaryEmbedding", [k, positions, cos, sin], ascope, domain=MSFT)
            gqa = dict(num_heads=geometry.kv.num_heads, kv_num_heads=geometry.kv.num_kv_heads,
                       scale=geometry.scaling, do_rotary=0, local_window_size=self.local_window_size(config, i))
            if softcap:
                gqa["softcap"] = float(softcap)
            out = g.op("GroupQueryAttention",
                       [q, k, v, past[2 * i], past[2 * i + 1], seqlens, total, "", "", "",
                        bias, "", "", "", "", "", query_seqlens],
                       ascope, outputs=[f"{ascope}/GroupQueryAttention/output_0", present[2 * i], present[2 * i + 1]],
                       domain=MSFT, **gqa)[0]
            attn_out = emitter.linear(attn.o_proj, out, f"{apath}.o_proj")
            gamma, eps = _norm_weight(g, layer.post_attention_layernorm, f"{path}.post_attention_layernorm")
            x, residual = _skip_norm(g, attn_out, residual, gamma, eps, f"{path}.post_attention_layernorm")
            hidden = self.mlp(g, emitter, layer.mlp, x, f"{path}.mlp", fused_gate_up)
        gamma, eps = _norm_weight(g, inner.norm, "model.norm")
        x, _ = _skip_norm(g, hidden, residual, gamma, eps, "model.norm")
        logits = _emit_lm_head(g, emitter, model, x, tables, geometry.kv)
        cap = self.final_softcap(config)
        if cap is not None:  # c tanh(logits / c)
            c = g.const(float(cap), g.float_type)
            logits = g.op1("Mul", [g.op1("Tanh", [g.op1("Div", [logits, c], "lm_head")], "lm_head"), c], "lm_head")
        if g.float_type != np.float32:
            g.op("Cast", [logits], "lm_head", outputs=[LOGITS], to=TensorProto.FLOAT)
        else:
            producer = next(n for n in reversed(g.nodes) if logits in n.output)
            producer.output[list(producer.output).index(logits)] = LOGITS

    # x ─> gate/up projection (fused) ─> Split ─> [+ LoRA] ─> Sigmoid/Mul/Mul ─> down_proj
    def mlp(self, g: Graph, emitter: LinearEmitter, mlp: nn.Module, x: str, path: str, fuse: bool) -> str:
        """The gated SiLU MLP."""
        gate, up = emitter.group([(f"{path}.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")], x,
                                 f"{path}.gate_up_proj", fuse)
        scope = scope_of(path)
        act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate], f"{scope}/act_fn")], f"{scope}/act_fn")
        return emitter.linear(mlp.down_proj, g.op1("Mul", [act, up], scope), f"{path}.down_proj")


def float_type(model: nn.Module) -> np.dtype:
    """The graph's float type: the embedding table's (fp32 or fp16)."""
    dtype = model.model.embed_tokens.weight.dtype
    if dtype == torch.float32:
        return np.dtype(np.float32)
    if dtype == torch.float16:
        return np.dtype(np.float16)
    raise FastPathUnsupported(f"fast path: {dtype} models are not built (fp32 or fp16)")


def tied(model: nn.Module) -> bool:
    """The lm_head is the embedding table itself (one copy in the graph)."""
    head = getattr(model, "lm_head", None)
    embed = model.model.embed_tokens.weight
    return type(head) is nn.Linear and head.weight.data_ptr() == embed.data_ptr() and head.bias is None


# attention_mask ─> CumSum ─> Sub(1) ─> Where(mask == 0, 1) ─> Slice(last seq) = positions [B, S]
#                ─> Where(mask == 0, min, 0) ─> Unsqueeze ─> Expand [B, 1, S, T] = attention_bias
#                ─> Shape[1] = T ─> Cast(int32) = total_sequence_length ─> Sub(1) ─> Expand [B] = seqlens_k
# input_ids ─> Shape[1] = S ─> Cast(int32) ─> Expand [B] = query_seqlens
def _mask_subgraph(g: Graph, mask_bias: float) -> tuple[str, str, str, str, str]:
    """``(positions, attention_bias, seqlens_k, total_sequence_length, query_seqlens)`` from the inputs.

    ``query_seqlens`` (every row: all ``S`` query rows valid) is what lets GQA take a multi-token step with a
    past for a batch > 1 (without it onnxruntime requires batch 1 there); it changes nothing else.
    """
    scope = "model/attn_mask"
    one = g.const([1])
    ids_shape = g.op1("Shape", [INPUT_IDS], scope)
    mask_shape = g.op1("Shape", [ATTENTION_MASK], scope)
    batch = g.op1("Slice", [ids_shape, g.const([0]), one], scope)
    seq = g.op1("Slice", [ids_shape, one, g.const([2])], scope)
    total = g.op1("Slice", [mask_shape, one, g.const([2])], scope)
    is_pad = g.op1("Equal", [ATTENTION_MASK, g.const(0)], scope)
    cumsum = g.op1("CumSum", [ATTENTION_MASK, g.const(1)], scope)
    positions = g.op1("Where", [is_pad, g.const(1), g.op1("Sub", [cumsum, g.const(1)], scope)], scope)
    positions = g.op1("Slice", [positions, g.op1("Neg", [seq], scope), g.const([_INT64_MAX]), one], scope)
    bias = g.op1("Where", [is_pad, g.const(mask_bias, g.float_type), g.const(0.0, g.float_type)], scope)
    bias = g.op1("Unsqueeze", [bias, g.const([1, 2])], scope)
    bias = g.op1("Expand", [bias, g.op1("Concat", [batch, one, seq, total], scope, axis=0)], scope)
    total32 = g.op1("Cast", [g.op1("Squeeze", [total, g.const([0])], scope)], scope, to=TensorProto.INT32)
    seqlens = g.op1("Expand", [g.op1("Sub", [total32, g.const(1, np.int32)], scope), batch], scope)
    query_seqlens = g.op1("Expand", [g.op1("Cast", [seq], scope, to=TensorProto.INT32), batch], scope)
    return positions, bias, seqlens, total32, query_seqlens


def _rope_tables(model: nn.Module, g: Graph) -> tuple[str, str]:
    """``cos_cache`` / ``sin_cache`` [max_positions, head_dim / 2], computed as transformers computes them."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(rotary, "max_seq_len_cached")
    freqs = torch.arange(int(positions), dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    return g.floats("cos_cache", cos), g.floats("sin_cache", sin)


def _norm_weight(g: Graph, module: nn.Module, path: str) -> tuple[str, float]:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None or not hasattr(module, "weight"):
        raise FastPathUnsupported(f"fast path: {path} ({type(module).__name__}) is not an RMSNorm")
    return g.floats(f"{path}.weight", module.weight), float(eps)


def _emit_embedding(g: Graph, model: nn.Module, tables: dict[str, NBitsLinear]) -> str:
    scope = "model/embed_tokens"
    table = tables.get("embed")
    if table is None:
        weight = g.floats("model.embed_tokens.weight", model.model.embed_tokens.weight)
        return g.op1("Gather", [weight, INPUT_IDS], scope)
    # GatherBlockQuantized reads MatMulNBits' blocks as rows [V, k_blocks * block_bytes] (shared with lm_head
    # when they are tied): Reshape ─> GatherBlockQuantized(scales, zero_points)
    prefix = "lm_head" if tables.get("lm_head") is table else "model.embed_tokens"
    q, s, z = table_initializers(g, table, prefix)
    rows = g.op1("Reshape", [q, g.const([table.out_features, -1])], scope)
    out = g.op1("GatherBlockQuantized", [rows, INPUT_IDS, s] + ([z] if z else []), scope, domain=MSFT,
                bits=int(table.bits), block_size=int(table.block_size), gather_axis=0, quantize_axis=1)
    if table.in_features % table.block_size:
        out = g.op1("Slice", [out, g.const([0]), g.const([table.in_features]), g.const([-1])], scope)
    return out



# x ─> Reshape[-1, H] ─> Gemm(W [V, H], transB=1) ─> Reshape[B, S, V]   (tied fp32: one copy of the table)
# x ─> the table's lowering: MatMulNBits(shared qweight) / the lm_head module's own nodes (otherwise)
def _emit_lm_head(g: Graph, emitter: LinearEmitter, model: nn.Module, x: str, tables: dict[str, NBitsLinear],
                  geometry: KVGeometry) -> str:
    scope = "lm_head"
    table = tables.get("lm_head")
    if table is not None:  # the table's own lowering; its initializers are the embedding's when tied
        return emitter.table(table, x, "lm_head")
    if tied(model) and g.has("model.embed_tokens.weight"):
        lead = g.op1("Slice", [g.op1("Shape", [x], scope), g.const([0]), g.const([-1])], scope)
        x2 = g.op1("Reshape", [x, g.const([-1, geometry.hidden])], scope)
        y = g.op1("Gemm", [x2, "model.embed_tokens.weight"], scope, transB=1)
        return g.op1("Reshape", [y, g.op1("Concat", [lead, g.const([geometry.vocab])], scope, axis=0)], scope)
    return emitter.linear(model.lm_head, x, "lm_head")



# hidden ─┐
# residual ─> SkipSimplifiedLayerNormalization(gamma) ─> normed, residual + hidden (output 3)
def _skip_norm(g: Graph, hidden: str, residual: str, gamma: str, eps: float, path: str) -> tuple[str, str]:
    out = g.op("SkipSimplifiedLayerNormalization", [hidden, residual, gamma], scope_of(path), outputs=4, domain=MSFT,
               epsilon=eps)
    node = g.nodes[-1]
    del node.output[:]
    node.output.extend([out[0], "", "", out[3]])
    return out[0], out[3]
