"""The Gemma3 family (text): Gemma2's decoder with q/k norms and a second RoPE base for the sliding layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from .family import Rope, per_head_norms
from .gemma2 import Gemma2Family
from .graph import FastPathUnsupported, Graph

__all__ = ["Gemma3Family"]


class Gemma3Family(Gemma2Family):
    """Gemma3 (``gemma3_text``): Gemma2's graph (sandwich norms, windows on the ``layer_types`` sliding layers,
    soft-caps where the config sets them: none by default), plus ``q_norm`` / ``k_norm`` ((1 + w) RMSNorms over
    ``head_dim``) before RoPE, and one rotary table per layer type (``rope_parameters[layer_type]``: a local base
    for sliding layers, the global one, possibly ``linear``-scaled, for full layers). Bidirectional attention
    (embedding models) is refused."""

    model_types = ("gemma3_text",)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if getattr(model.config, "use_bidirectional_attention", False):
            raise FastPathUnsupported("fast path: gemma3 with use_bidirectional_attention is not causal")

    def qk_norm(self, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
        return per_head_norms(self, g, attn, q, k, path)

    def ropes(self, model: nn.Module) -> dict[str, Rope]:
        rotary = model.model.rotary_emb
        kinds = sorted(set(model.config.layer_types))
        try:
            return {kind: Rope(getattr(rotary, f"{kind}_inv_freq"), float(getattr(rotary, f"{kind}_attention_scaling")),
                               rotary.rope_type[kind]) for kind in kinds}
        except (AttributeError, KeyError, TypeError) as error:
            raise FastPathUnsupported(f"fast path: gemma3 rotary embedding without per-layer-type tables ({error})") \
                from None

    def rope_key(self, config: Any, layer: int) -> str:
        return config.layer_types[layer]
