"""The Llama family: :class:`~.family.DecoderFamily` as it is."""

from __future__ import annotations

from .family import DecoderFamily

__all__ = ["LlamaFamily"]


class LlamaFamily(DecoderFamily):
    """Llama: RMSNorm, RoPE, GQA, gated SiLU MLP; Llama's optional attention biases come from the modules
    themselves."""

    model_types = ("llama",)
