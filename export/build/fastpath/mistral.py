"""The Mistral family: the Llama decoder with an optional sliding window on every layer."""

from __future__ import annotations

from typing import Any

from .family import DecoderFamily, gqa_window

__all__ = ["MistralFamily"]


class MistralFamily(DecoderFamily):
    """Mistral: Llama's graph; ``config.sliding_window`` (every layer) is GQA's ``local_window_size`` (the same
    number of keys: :func:`~.family.gqa_window`). The past keeps every position, as the graph's interface does; the window is
    the attention's, as in transformers' mask."""

    model_types = ("mistral",)

    def local_window_size(self, config: Any, layer: int) -> int:
        return gqa_window(getattr(config, "sliding_window", None))
