"""The Qwen3 family: Qwen2's decoder with an RMSNorm over each head of q and k before the rotary embedding."""

from __future__ import annotations

from torch import nn

from .graph import FastPathUnsupported, Graph, scope_of
from .qwen2 import Qwen2Family

__all__ = ["Qwen3Family"]


class Qwen3Family(Qwen2Family):
    """Qwen3: ``q_norm`` / ``k_norm`` (RMSNorm over ``head_dim``, one weight shared by the heads) on the
    projections, before RoPE; q/k/v biases (none by default) and sliding layers as Qwen2."""

    model_types = ("qwen3",)

    # q [B, S, H * D] ─> Reshape [B, S, H, D] ─> SimplifiedLayerNormalization(q_norm) ─> Reshape [B, S, H * D]
    def qk_norm(self, g: Graph, attn: nn.Module, q: str, k: str, path: str) -> tuple[str, str]:
        head_dim = int(attn.head_dim)
        scope = scope_of(path)
        heads = g.const([0, 0, -1, head_dim])
        flat = g.const([0, 0, -1])
        out = []
        for x, name in ((q, "q_norm"), (k, "k_norm")):
            norm = getattr(attn, name, None)
            if norm is None or tuple(norm.weight.shape) != (head_dim,):
                raise FastPathUnsupported(f"fast path: {path}.{name} is not an RMSNorm over head_dim {head_dim}")
            gamma, eps = self._norm_weight(g, norm, f"{path}.{name}")
            per_head = g.op1("Reshape", [x, heads], f"{scope}/{name}")
            normed = g.op1("SimplifiedLayerNormalization", [per_head, gamma], f"{scope}/{name}", epsilon=eps, axis=-1,
                           stash_type=1)
            out.append(g.op1("Reshape", [normed, flat], f"{scope}/{name}"))
        return out[0], out[1]
