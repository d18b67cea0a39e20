"""The Phi-3 family: the Llama decoder with fused ``qkv_proj`` and ``gate_up_proj`` modules (and an optional window)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .family import DecoderFamily, gqa_window
from .graph import Graph, scope_of
from .linear import LinearEmitter

__all__ = ["Phi3Family"]


class Phi3Family(DecoderFamily):
    """Phi-3: one ``qkv_proj`` and one ``gate_up_proj`` module each; an adapter on either is a branch on the fused
    module (AdaLoRA adapts it as one), so the branch is added to the fused output and the sum is split, as
    transformers slices the module's output. ``config.sliding_window`` (every layer, as Mistral's) is GQA's
    ``local_window_size``; a partial rotary (``partial_rotary_factor``, Phi-4-mini) is the shared decoder's;
    ``longrope`` (its factors switch with the sequence length) is refused by the shared geometry check."""

    model_types = ("phi3",)

    # x ─> qkv_proj (base [+ branch]) ─> [Split [heads * D, kv_heads * D, kv_heads * D]] ─> q, k, v (or packed)
    def project_qkv(self, g: Graph, emitter: LinearEmitter, attn: nn.Module, x: str, path: str,
                    fuse: bool, packed: bool = False) -> tuple[str, ...]:
        qkv = emitter.linear(attn.qkv_proj, x, f"{path}.qkv_proj")
        if packed:  # already GroupQueryAttention's packed layout
            return (qkv,)
        q_size = attn.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        q, k, v = g.op("Split", [qkv, g.const([q_size, kv_size, kv_size])], scope_of(f"{path}.qkv_proj"), outputs=3,
                       axis=-1)
        return q, k, v

    # x ─> gate_up_proj (base [+ branch]) ─> Split (halves) ─> up * act(gate) ─> down_proj
    def mlp(self, g: Graph, emitter: LinearEmitter, mlp: nn.Module, x: str, path: str, fuse: bool) -> str:
        gate_up = emitter.linear(mlp.gate_up_proj, x, f"{path}.gate_up_proj")
        half = int(mlp.config.intermediate_size)
        gate, up = g.op("Split", [gate_up, g.const([half, half])], scope_of(f"{path}.gate_up_proj"), outputs=2, axis=-1)
        scope = scope_of(path)
        return emitter.linear(mlp.down_proj, g.op1("Mul", [up, self.activation(g, gate, scope)], scope),
                              f"{path}.down_proj")

    def local_window_size(self, config: Any, layer: int) -> int:
        return gqa_window(getattr(config, "sliding_window", None))
