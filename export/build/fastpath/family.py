"""The decoder every fast-path architecture family shares, with one hook per place where families differ.

:class:`DecoderFamily` emits a pre-norm decoder (RMSNorm, rotary embedding, GroupQueryAttention, gated MLP)
node by node; a family (:mod:`.llama`, :mod:`.mistral`, :mod:`.qwen2`, :mod:`.qwen3`, :mod:`.gemma`,
:mod:`.gemma2`, :mod:`.gemma3`, :mod:`.phi3`) is a subclass that names its ``model_type`` values and overrides
only the hooks its architecture needs::

    hook                      default (Llama)                         overridden by
    check(model)              refuse what the base class cannot build  every family, for its own configs
    qkv(attn, path)           q_proj, k_proj, v_proj (fused here when  -
                              their bases allow)
    project_qkv(...)          qkv() through one (fused) group, packed  Phi3: one qkv_proj module (Split after
                              (no Split) when GQA rotates              it unless GQA rotates)
    qk_norm(g, attn, q, k)    none                                    Qwen3, Gemma3: RMSNorm per head
    rotary_in_attention(m)    GQA's own RoPE; RotaryEmbedding nodes   - (derived: Qwen3, Gemma3 and tables GQA
                              where qk_norm is overridden or GQA       refuses get RotaryEmbedding)
                              refuses the table
    norm_gamma(module)        the RMSNorm's weight                    Gemma: 1 + w
    embedding_scale(config)   none                                    Gemma: x sqrt(hidden)
    activation(g, gate)       SiLU                                    Gemma: GeLU (tanh)
    mlp(...)                  gate_proj, up_proj (fused when allowed) Phi3: one gate_up_proj module
    mlp_input_norm            post_attention_layernorm                Gemma2: pre_feedforward_layernorm
    attention_output_norm     none                                    Gemma2: post_attention_layernorm
    mlp_output_norm           none                                    Gemma2: post_feedforward_layernorm
    attention_softcap(config) 0 (GQA's softcap attribute left out)    Gemma2: attn_logit_softcapping
    final_softcap(config)     none                                    Gemma2: final_logit_softcapping
    local_window_size(i)      -1 (full attention)                     Mistral, Phi3: sliding_window; Qwen2/3,
                                                                      Gemma2/3: the layer_types' sliding layers
    ropes(model), rope_key(i) one rotary embedding                    Gemma3: one per layer type (two bases)

Attention biases need no hook: the linear lowering (:mod:`.linear`) adds any projection's bias (Qwen2's q/k/v).
Nor does a partial rotary (``partial_rotary_factor``: RoPE on the first dims of each head, the rest passed
through): GroupQueryAttention and RotaryEmbedding (``rotary_embedding_dim``) take it from the table's width.

Where RoPE is applied (:meth:`DecoderFamily.rotary_in_attention`). Where it can, GroupQueryAttention rotates q and
k itself (``do_rotary=1``, ``cos_cache`` / ``sin_cache``, ``position_ids`` = the per-row positions
``cumsum(mask) - 1``), reading q/k/v packed from the fused projection: no Split and no RotaryEmbedding nodes,
three nodes a layer fewer. That is exact for left-padded batches because onnxruntime 1.32's CPU kernel, given
``query_seqlens`` (always, here), reads ``position_ids`` per element on the prompt as on decode steps (measured:
outputs and present tensors bitwise equal to RotaryEmbedding + GQA on left-padded prompts, decode steps of 1
and 3 tokens, a shared KV buffer, a window, fp16). Its schema still says a first prompt reads only the first
element, which is what the kernel does without ``query_seqlens`` (and onnxruntime 1.31, which has no such
input): ``position_ids[0, 0] + i`` for every row, which no table offset can make right for a batch whose rows
are padded differently; the graph never runs there (it needs ``query_seqlens``). Left on RotaryEmbedding nodes:
families with q/k norms (the norms sit between projection and RoPE; GQA's ``q_norm_weight`` is rejected by the
CPU kernel) and tables GQA refuses (``cos_cache`` width not a multiple of 8, e.g. 24 of 32 dims rotated).

GroupQueryAttention's ``local_window_size`` w: in onnxruntime 1.32's CPU kernel a query at cache index i sees
the w keys ``(i - w, i]`` (it zeroes ``[0, i + 1 - w)``), which is transformers' ``sliding_window`` s (``kv > i - s``):
``local_window_size = s`` (:func:`gqa_window`). Earlier versions of the kernel's source zero ``[0, i - w)``, one
key more (read, not measured here); so a window is built only where the installed onnxruntime is one whose kernel
was measured against transformers (:data:`WINDOW_VERIFIED_ORT`): prompts and decode steps longer than the window,
s - 1 and s + 1 both off by ~0.1 in the logits, s exact (tests/export/test_fastpath_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from ...contract import ATTENTION_MASK, INPUT_IDS, LOGITS, KVGeometry, kv_names
from ..modules import NBitsLinear
from .graph import FastPathUnsupported, Graph, scope_of
from .linear import MSFT, Branch, LinearEmitter, table_initializers

__all__ = ["WINDOW_VERIFIED_ORT", "DecoderFamily", "Geometry", "Rope", "gqa_window", "layer_window", "per_head_norms"]

_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE types whose inverse frequencies do not depend on the sequence length (a fixed cos/sin table)."""
_INT64_MAX = np.iinfo(np.int64).max
_GQA_ROTARY_WIDTH_MULTIPLE = 8
"""GroupQueryAttention's ``cos_cache`` width must be a multiple of this (onnxruntime 1.32's CPU kernel: "cos_cache
dimension 1 must be <= head_size / 2 and a multiple of 8")."""
_FP16_MASK_BIAS = -1e4
"""Additive mask for pad keys in fp16 graphs: large enough that exp() underflows to 0, small enough that a fully
masked (pad) query row stays finite (finfo(fp16).min plus a negative score overflows to -inf, and an all -inf
row would put NaN into the pad positions' keys and values). fp32 graphs use finfo(fp32).min, as transformers."""


WINDOW_VERIFIED_ORT = (1, 32)
"""The oldest onnxruntime whose GroupQueryAttention window was measured equal to transformers' sliding window."""


def gqa_window(sliding_window: int | None) -> int:
    """GroupQueryAttention's ``local_window_size`` for transformers' ``sliding_window`` (``None``: -1, none).

    Raises:
        FastPathUnsupported: a window, and no installed onnxruntime at least :data:`WINDOW_VERIFIED_ORT`.
    """
    if sliding_window is None:
        return -1
    if int(sliding_window) < 1:
        raise FastPathUnsupported(f"fast path: sliding_window {sliding_window!r} (expected >= 1)")
    version = _onnxruntime_version()
    if version is None or version < WINDOW_VERIFIED_ORT:
        raise FastPathUnsupported(f"fast path: a sliding window needs onnxruntime >= "
                                  f"{'.'.join(map(str, WINDOW_VERIFIED_ORT))} (its GroupQueryAttention window was "
                                  f"measured there; older kernels see one key more), found {version}")
    return int(sliding_window)


def layer_window(config: Any, layer: int) -> int:
    """``local_window_size`` of layer ``layer`` where ``config.layer_types`` names the sliding layers (Qwen2/3, Gemma2/3)."""
    layer_types = getattr(config, "layer_types", None) or ()
    if layer < len(layer_types) and layer_types[layer] == "sliding_attention":
        return gqa_window(getattr(config, "sliding_window", None))
    return -1


def _onnxruntime_version() -> tuple[int, int] | None:
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            major, minor = metadata.version(dist).split(".")[:2]
            return int(major), int(minor)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class Rope:
    """One rotary embedding's inverse frequencies, cos/sin scale and transformers' ``rope_type``."""

    inv_freq: torch.Tensor
    attention_scaling: float
    rope_type: str


@dataclass(frozen=True)
class Geometry:
    """The graph's KV geometry (:class:`~adalora_deploy.export.contract.KVGeometry`) and the attention scale."""

    kv: KVGeometry
    scaling: float


class DecoderFamily:
    """A pre-norm decoder-only transformer as onnxruntime's fused ops; subclasses override the hooks."""

    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values this family builds."""
    hidden_acts: ClassVar[tuple[str, ...]] = ("silu",)
    """``config.hidden_act`` values :meth:`activation` computes."""
    mlp_input_norm: ClassVar[str] = "post_attention_layernorm"
    """The decoder layer's attribute holding the norm before the MLP (fused with the residual add)."""
    attention_output_norm: ClassVar[str | None] = None
    """A norm of the attention's output before its residual add (Gemma2/3: ``post_attention_layernorm``)."""
    mlp_output_norm: ClassVar[str | None] = None
    """A norm of the MLP's output before its residual add (Gemma2/3: ``post_feedforward_layernorm``)."""

    # --- hooks --------------------------------------------------------------------------------------------

    def check(self, model: nn.Module) -> None:
        """Raise :class:`FastPathUnsupported` for a model of this family that the graph would compute wrongly."""
        config = model.config
        if getattr(config, "hidden_act", self.hidden_acts[0]) not in self.hidden_acts:
            raise FastPathUnsupported(f"fast path: {config.model_type} hidden_act {config.hidden_act!r} (built: "
                                      f"{', '.join(self.hidden_acts)})")
        for i, kind in enumerate(getattr(config, "layer_types", None) or ()):
            # a sliding layer is built only by a family that gives it a window
            if kind != "full_attention" and not (kind == "sliding_attention" and self.local_window_size(config, i) > 0):
                raise FastPathUnsupported(f"fast path: {config.model_type} layer {i} is {kind!r} and gets no window "
                                          "(built: full_attention, and sliding_attention where the family gives it "
                                          "a window)")

    def qkv(self, attn: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
        """The q, k, v projections (module path, module), fused into one base node when compatible."""
        return [(f"{path}.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]

    def project_qkv(self, g: Graph, emitter: LinearEmitter, attn: nn.Module, x: str, path: str,
                    fuse: bool, packed: bool = False) -> tuple[str, ...]:
        """Queries, keys and values [B * S, heads * head_dim] (token rows) from the normed hidden rows ``x``.

        With ``packed``: one tensor [B * S, (heads + 2 kv_heads) * head_dim] (q, k, v concatenated) where the
        projection yields it without a Split (GroupQueryAttention's packed input), else q, k, v as without.
        """
        return tuple(emitter.group(self.qkv(attn, path), x, f"{path}.qkv_proj", fuse, split=not packed))

    def qk_norm(self, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
        """Queries and keys after any per-head normalization, before rotary embedding (none here)."""
        return q, k

    def rotary_in_attention(self, model: nn.Module) -> bool:
        """Whether GroupQueryAttention applies RoPE itself (``do_rotary``; see the module docstring), else
        RotaryEmbedding nodes before it: not where the family normalizes q/k before RoPE (overrides
        :meth:`qk_norm`), nor where a table's width (rotary dims / 2) is not a multiple of 8, which GQA refuses."""
        if type(self).qk_norm is not DecoderFamily.qk_norm:
            return False
        return all(int(rope.inv_freq.numel()) % _GQA_ROTARY_WIDTH_MULTIPLE == 0 for rope in self.ropes(model).values())

    def norm_gamma(self, module: nn.Module) -> torch.Tensor:
        """The multiplier of an RMSNorm's normalized input (its weight here)."""
        return module.weight

    def activation(self, g: Graph, gate: str, scope: str) -> str:
        """The gated MLP's activation of the gate projection (SiLU here)."""
        return g.op1("Mul", [gate, g.op1("Sigmoid", [gate], f"{scope}/act_fn")], f"{scope}/act_fn")

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

    def ropes(self, model: nn.Module) -> dict[str, Rope]:
        """The model's rotary embeddings by :meth:`rope_key` (one, ``""``, here: ``model.model.rotary_emb``)."""
        rotary = model.model.rotary_emb
        return {"": Rope(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)),
                         getattr(rotary, "rope_type", "default"))}

    def rope_key(self, config: Any, layer: int) -> str:
        """Which of :meth:`ropes` layer ``layer`` rotates with."""
        return ""

    def _norm_weight(self, g: Graph, module: nn.Module, path: str) -> tuple[str, float]:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if eps is None or not hasattr(module, "weight"):
            raise FastPathUnsupported(f"fast path: {path} ({type(module).__name__}) is not an RMSNorm")
        return g.floats(f"{path}.weight", self.norm_gamma(module)), float(eps)

    # sublayer output ─> SimplifiedLayerNormalization (a norm before the residual add; none: as it is)
    def _sandwich(self, g: Graph, layer: nn.Module, name: str | None, x: str, path: str) -> str:
        if name is None:
            return x
        gamma, eps = self._norm_weight(g, getattr(layer, name), f"{path}.{name}")
        return g.op1("SimplifiedLayerNormalization", [x, gamma], scope_of(f"{path}.{name}"), epsilon=eps, axis=-1,
                     stash_type=1)

    # --- the decoder --------------------------------------------------------------------------------------

    def geometry(self, model: nn.Module) -> Geometry:
        """Check the structure every family shares and read its geometry."""
        self.check(model)
        config = model.config
        inner = getattr(model, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if inner is None or not hasattr(inner, attr):
                raise FastPathUnsupported(f"fast path: {type(model).__name__} has no model.{attr}")
        kv = KVGeometry.of(config)
        for i in range(kv.num_layers):  # a window the installed onnxruntime cannot be trusted with: refused now
            self.local_window_size(config, i)
        for rope in self.ropes(model).values():
            if rope.rope_type not in _STATIC_ROPE_TYPES:
                raise FastPathUnsupported(f"fast path: rope_type {rope.rope_type!r} depends on the sequence length "
                                          f"(built: {_STATIC_ROPE_TYPES})")
            rotary_dim = 2 * int(rope.inv_freq.numel())
            if rotary_dim > kv.head_dim:
                raise FastPathUnsupported(f"fast path: rotary over {rotary_dim} of {kv.head_dim} dims")
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
        positions, bias, seqlens, total, query_seqlens, batch_seq = _mask_subgraph(g, mask_bias)
        ropes = {key: _rope_tables(model, g, rope, f"_{key}" if key else "") for key, rope in self.ropes(model).items()}
        cos_dims = {ropes[key][0]: 2 * int(rope.inv_freq.numel()) for key, rope in self.ropes(model).items()}
        hidden = _emit_embedding(g, model, tables)
        scale = self.embedding_scale(config)
        if scale is not None:
            hidden = g.op1("Mul", [hidden, g.const(scale, g.float_type)], "model/embed_tokens")
        # hidden states are token rows [B * S, H] from here to the logits, reshaped to [B, S, .] around
        # GroupQueryAttention only (the package docstring says why: a branch's up-projection + sum is one Gemm)
        hidden = g.op1("Reshape", [hidden, g.const([-1, geometry.kv.hidden])], "model/embed_tokens")
        attn_width = geometry.kv.num_heads * geometry.kv.head_dim
        past, present = kv_names(geometry.kv.num_layers)
        softcap = self.attention_softcap(config)
        rotary_in_gqa = self.rotary_in_attention(model)
        residual = None
        x = None
        for i, layer in enumerate(inner.layers):
            path = f"model.layers.{i}"
            gamma, eps = self._norm_weight(g, layer.input_layernorm, f"{path}.input_layernorm")
            if residual is None:
                x = g.op1("SimplifiedLayerNormalization", [hidden, gamma], f"{scope_of(path)}/input_layernorm",
                          epsilon=eps, axis=-1, stash_type=1)
                residual = hidden
            else:
                x, residual = _skip_norm(g, hidden, residual, gamma, eps, f"{path}.input_layernorm")
            attn = layer.self_attn
            apath = f"{path}.self_attn"
            ascope = scope_of(apath)
            qkv = tuple(g.op1("Reshape", [t, batch_seq], ascope)
                        for t in self.project_qkv(g, emitter, attn, x, apath, fused_qkv, packed=rotary_in_gqa))
            cos, sin = ropes[self.rope_key(config, i)]
            if rotary_in_gqa:  # packed q/k/v (key and value left empty) or the three, rotated by GQA
                q, k, v = (qkv[0], "", "") if len(qkv) == 1 else qkv
                rotary = [cos, sin, positions]
            else:
                q, k, v = qkv
                q, k = self.qk_norm(g, attn, q, k, apath)
                q = g.op1("RotaryEmbedding", [q, positions, cos, sin], ascope, domain=MSFT,
                          **_partial_rotary(cos_dims[cos], geometry.kv.head_dim, geometry.kv.num_heads))
                k = g.op1("RotaryEmbedding", [k, positions, cos, sin], ascope, domain=MSFT,
                          **_partial_rotary(cos_dims[cos], geometry.kv.head_dim, geometry.kv.num_kv_heads))
                rotary = ["", "", ""]
            gqa = dict(num_heads=geometry.kv.num_heads, kv_num_heads=geometry.kv.num_kv_heads,
                       scale=geometry.scaling, do_rotary=int(rotary_in_gqa),
                       local_window_size=self.local_window_size(config, i))
            if softcap:
                gqa["softcap"] = float(softcap)
            out = g.op("GroupQueryAttention",
                       [q, k, v, past[2 * i], past[2 * i + 1], seqlens, total, *rotary,
                        bias, "", "", "", "", "", query_seqlens],
                       ascope, outputs=[f"{ascope}/GroupQueryAttention/output_0", present[2 * i], present[2 * i + 1]],
                       domain=MSFT, **gqa)[0]
            out = g.op1("Reshape", [out, g.const([-1, attn_width])], ascope)
            attn_out = emitter.linear(attn.o_proj, out, f"{apath}.o_proj")
            attn_out = self._sandwich(g, layer, self.attention_output_norm, attn_out, path)
            norm_name = self.mlp_input_norm
            gamma, eps = self._norm_weight(g, getattr(layer, norm_name), f"{path}.{norm_name}")
            x, residual = _skip_norm(g, attn_out, residual, gamma, eps, f"{path}.{norm_name}")
            hidden = self.mlp(g, emitter, layer.mlp, x, f"{path}.mlp", fused_gate_up)
            hidden = self._sandwich(g, layer, self.mlp_output_norm, hidden, path)
        gamma, eps = self._norm_weight(g, inner.norm, "model.norm")
        x, _ = _skip_norm(g, hidden, residual, gamma, eps, "model.norm")
        logits = g.op1("Reshape", [_emit_lm_head(g, emitter, model, x, tables), batch_seq], "lm_head")
        cap = self.final_softcap(config)
        if cap is not None:  # c tanh(logits / c)
            c = g.const(float(cap), g.float_type)
            logits = g.op1("Mul", [g.op1("Tanh", [g.op1("Div", [logits, c], "lm_head")], "lm_head"), c], "lm_head")
        if g.float_type != np.float32:
            g.op("Cast", [logits], "lm_head", outputs=[LOGITS], to=TensorProto.FLOAT)
        else:
            producer = next(n for n in reversed(g.nodes) if logits in n.output)
            producer.output[list(producer.output).index(logits)] = LOGITS

    # x ─> gate/up projection (fused) [+ one LoRA branch] ─> Split ─> [+ LoRA] ─> Sigmoid/Mul/Mul ─> down_proj
    def mlp(self, g: Graph, emitter: LinearEmitter, mlp: nn.Module, x: str, path: str, fuse: bool) -> str:
        """The gated MLP: ``down_proj(activation(gate_proj(x)) * up_proj(x))``."""
        gate, up = emitter.group([(f"{path}.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")], x,
                                 f"{path}.gate_up_proj", fuse)
        scope = scope_of(path)
        act = self.activation(g, gate, scope)
        return emitter.linear(mlp.down_proj, g.op1("Mul", [act, up], scope), f"{path}.down_proj")


# q [B, S, H * D] ─> Reshape [B, S, H, D] ─> SimplifiedLayerNormalization(q_norm) ─> Reshape [B, S, H * D]; k alike
def per_head_norms(family: DecoderFamily, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
    """``attn.q_norm`` / ``attn.k_norm`` (RMSNorms over ``head_dim``, one weight shared by the heads, its multiplier
    from ``family.norm_gamma``) on queries and keys: Qwen3's and Gemma3's :meth:`DecoderFamily.qk_norm`."""
    head_dim = int(attn.head_dim)
    scope = scope_of(path)
    heads = g.const([0, 0, -1, head_dim])
    flat = g.const([0, 0, -1])
    out = []
    for x, name in ((q, "q_norm"), (k, "k_norm")):
        norm = getattr(attn, name, None)
        if norm is None or tuple(norm.weight.shape) != (head_dim,):
            raise FastPathUnsupported(f"fast path: {path}.{name} is not an RMSNorm over head_dim {head_dim}")
        gamma, eps = family._norm_weight(g, norm, f"{path}.{name}")
        per_head = g.op1("Reshape", [x, heads], f"{scope}/{name}")
        normed = g.op1("SimplifiedLayerNormalization", [per_head, gamma], f"{scope}/{name}", epsilon=eps, axis=-1,
                       stash_type=1)
        out.append(g.op1("Reshape", [normed, flat], f"{scope}/{name}"))
    return out[0], out[1]


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
#           ─> Shape ─> Concat([B, S], [-1]) = batch_seq (token rows back to [B, S, -1])
def _mask_subgraph(g: Graph, mask_bias: float) -> tuple[str, str, str, str, str, str]:
    """``(positions, attention_bias, seqlens_k, total_sequence_length, query_seqlens, batch_seq)`` from the inputs.

    ``positions`` [B, S] (int64) feed RotaryEmbedding or GroupQueryAttention's ``position_ids``: pads read row 1
    of the table, any row would do (masked by ``attention_bias``, and in range for GQA's bounds check).

    ``query_seqlens`` (every row: all ``S`` query rows valid) is what lets GQA take a multi-token step with a
    past for a batch > 1 (without it onnxruntime requires batch 1 there), and what makes GQA's own rotary read
    ``position_ids`` per element on a prompt (module docstring); it changes nothing else.
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
    batch_seq = g.op1("Concat", [ids_shape, g.const([-1])], scope, axis=0)
    return positions, bias, seqlens, total32, query_seqlens, batch_seq


def _partial_rotary(rotary_dim: int, head_dim: int, heads: int) -> dict[str, int]:
    """RotaryEmbedding's attributes for rotating the first ``rotary_dim`` of ``head_dim`` dims of each head
    (transformers' ``partial_rotary_factor``: the rest pass through); none for a full rotation."""
    return {} if rotary_dim == head_dim else {"rotary_embedding_dim": rotary_dim, "num_heads": heads}


def _rope_tables(model: nn.Module, g: Graph, rope: Rope, suffix: str) -> tuple[str, str]:
    """``cos_cache`` / ``sin_cache`` (+ ``suffix``) [max_positions, head_dim / 2], as transformers computes them."""
    rotary = model.model.rotary_emb
    inv_freq = rope.inv_freq.detach().float()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(rotary, "max_seq_len_cached")
    freqs = torch.arange(int(positions), dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos() * rope.attention_scaling, freqs.sin() * rope.attention_scaling
    return g.floats(f"cos_cache{suffix}", cos), g.floats(f"sin_cache{suffix}", sin)


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



# x ─> Gemm(W [V, H], transB=1)   (tied fp32: one copy of the table)
# x ─> the table's lowering: MatMulNBits(shared qweight) / the lm_head module's own nodes (otherwise)
def _emit_lm_head(g: Graph, emitter: LinearEmitter, model: nn.Module, x: str, tables: dict[str, NBitsLinear]) -> str:
    """Logits [B * S, V] of the final hidden rows ``x``."""
    table = tables.get("lm_head")
    if table is not None:  # the table's own lowering; its initializers are the embedding's when tied
        return emitter.table(table, x, "lm_head")
    if tied(model) and g.has("model.embed_tokens.weight"):
        return g.op1("Gemm", [x, "model.embed_tokens.weight"], "lm_head", transB=1)
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
