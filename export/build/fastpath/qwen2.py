"""The Qwen2 family: the Llama decoder with biases on q/k/v (emitted by the linear lowering from the modules)."""

from __future__ import annotations

from typing import Any

from .family import DecoderFamily, layer_window

__all__ = ["Qwen2Family"]


class Qwen2Family(DecoderFamily):
    """Qwen2: Llama's graph; with ``use_sliding_window`` the layers ``config.layer_types`` names sliding get GQA's
    ``local_window_size`` (:func:`~.family.layer_window`)."""

    model_types = ("qwen2",)

    def local_window_size(self, config: Any, layer: int) -> int:
        return layer_window(config, layer)
