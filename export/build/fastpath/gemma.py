"""The Gemma family: the Llama decoder with a scaled embedding, (1 + w) RMSNorms and a GeLU (tanh) gated MLP."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .family import DecoderFamily
from .graph import FastPathUnsupported, Graph

__all__ = ["GemmaFamily"]

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh")
"""transformers' activation names of the tanh-approximated GeLU (Gemma's config rewrites a legacy ``gelu`` to the
first)."""


class GemmaFamily(DecoderFamily):
    """Gemma: ``embed_tokens(ids) * sqrt(hidden)`` (the factor in the graph's float type, as transformers casts it
    to the weights' dtype), RMSNorms that multiply by ``1 + w`` (folded into the norm's weight: fp32 in transformers
    too, so exact in fp32 graphs), ``down(gelu_tanh(gate(x)) * up(x))``. ``head_dim`` need not be
    hidden / heads: the geometry reads it from the config, the scale from the attention module."""

    model_types = ("gemma",)

    hidden_acts = _GELU_TANH

    def check(self, model: nn.Module) -> None:
        super().check(model)
        scale = getattr(getattr(getattr(model, "model", None), "embed_tokens", None), "embed_scale", None)
        if scale is not None and float(scale) != self.embedding_scale(model.config):
            raise FastPathUnsupported(f"fast path: gemma embed_scale {float(scale)} is not sqrt(hidden_size)")

    def norm_gamma(self, module: nn.Module) -> torch.Tensor:
        return 1.0 + module.weight.float()

    def embedding_scale(self, config: Any) -> float:
        # transformers keeps sqrt(hidden) as an fp32 tensor and casts that to the weights' dtype
        return float(np.float32(float(config.hidden_size) ** 0.5))

    # gate ─> Gelu(approximate="tanh")
    def activation(self, g: Graph, gate: str, scope: str) -> str:
        return g.op1("Gelu", [gate], f"{scope}/act_fn", approximate="tanh")
