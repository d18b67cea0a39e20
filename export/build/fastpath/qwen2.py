"""The Qwen2 family: the Llama decoder with biases on q/k/v (emitted by the linear lowering from the modules)."""

from __future__ import annotations

from torch import nn

from .graph import FastPathUnsupported
from .llama import LlamaFamily

__all__ = ["Qwen2Family"]


class Qwen2Family(LlamaFamily):
    """Qwen2: Llama's graph; ``use_sliding_window`` is refused (GQA's local window semantics unverified)."""

    model_types = ("qwen2",)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if getattr(model.config, "use_sliding_window", False):
            raise FastPathUnsupported("fast path: qwen2 with use_sliding_window is not built")
