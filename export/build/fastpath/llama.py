"""The Llama family (llama, mistral): :class:`~.family.DecoderFamily` as it is, minus sliding windows."""

from __future__ import annotations

from torch import nn

from .family import DecoderFamily
from .graph import FastPathUnsupported

__all__ = ["LlamaFamily"]


class LlamaFamily(DecoderFamily):
    """Llama and Mistral: RMSNorm, RoPE, GQA, gated SiLU MLP; Llama's optional attention biases come from the
    modules themselves."""

    model_types = ("llama", "mistral")

    def check(self, model: nn.Module) -> None:
        super().check(model)
        config = model.config
        if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
            raise FastPathUnsupported("fast path: mistral with a sliding window is not built (GQA local_window_size "
                                      "semantics unverified)")
