"""The Qwen3 family: Qwen2's decoder with an RMSNorm over each head of q and k before the rotary embedding."""

from __future__ import annotations

from torch import nn

from .family import per_head_norms
from .graph import Graph
from .qwen2 import Qwen2Family

__all__ = ["Qwen3Family"]


class Qwen3Family(Qwen2Family):
    """Qwen3: ``q_norm`` / ``k_norm`` (RMSNorm over ``head_dim``, one weight shared by the heads) on the
    projections, before RoPE; q/k/v biases (none by default) and sliding layers as Qwen2."""

    model_types = ("qwen3",)

    def qk_norm(self, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
        return per_head_norms(self, g, attn, q, k, path)
