"""The Gemma2 family: Gemma's decoder with norms after attention and MLP, soft-capping and alternating windows."""

from __future__ import annotations

from typing import Any

from torch import nn

from .family import layer_window
from .gemma import _GELU_TANH, GemmaFamily
from .graph import FastPathUnsupported

__all__ = ["Gemma2Family"]


class Gemma2Family(GemmaFamily):
    """Gemma2: Gemma's embedding scale, (1 + w) norms and GeLU (tanh, ``config.hidden_activation``); each sublayer's
    output is normed before its residual add (``post_attention_layernorm``, ``post_feedforward_layernorm``; the MLP's
    input norm is ``pre_feedforward_layernorm``); attention scores are soft-capped by GroupQueryAttention's
    ``softcap`` (onnxruntime caps the scaled scores before adding the mask, as transformers' eager attention does);
    the logits by ``c tanh(logits / c)``; the layers ``config.layer_types`` names sliding get the window; the scale
    is ``query_pre_attn_scalar ** -0.5`` (read from the attention module)."""

    model_types = ("gemma2",)
    mlp_input_norm = "pre_feedforward_layernorm"
    attention_output_norm = "post_attention_layernorm"
    mlp_output_norm = "post_feedforward_layernorm"

    def check(self, model: nn.Module) -> None:
        super().check(model)
        activation = getattr(model.config, "hidden_activation", None)
        if activation not in _GELU_TANH:
            raise FastPathUnsupported(f"fast path: {model.config.model_type} hidden_activation {activation!r} "
                                      f"(built: {', '.join(_GELU_TANH)})")

    def attention_softcap(self, config: Any) -> float:
        return float(getattr(config, "attn_logit_softcapping", None) or 0.0)

    def final_softcap(self, config: Any) -> float | None:
        cap = getattr(config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def local_window_size(self, config: Any, layer: int) -> int:
        return layer_window(config, layer)
