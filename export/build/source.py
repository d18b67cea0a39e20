"""The source model of an export: the base loaded as in training with the trained adapter injected."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import nn

from adalora_deploy.adapters import find_adapters, replace_module
from adalora_deploy.models import load_trained_model

__all__ = ["adapters_bypassed", "load_source_model"]


def load_source_model(base: str | os.PathLike, adapter: str | os.PathLike, *, quantization: str,
                      double_quant: bool = False) -> nn.Module:
    """The base loaded as ``quantization`` with the adapter injected (compacted), frozen, eval, on CPU.

    bnb 4-bit layers compute as in training (see :func:`adalora_deploy.models.load_trained_model`).
    """
    return load_trained_model(base, adapter, quantization=quantization, double_quant=double_quant, device="cpu")


@contextlib.contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`AdaLoraLinear` of ``model`` is replaced by its base layer."""
    layers = dict(find_adapters(model).items())
    for name, layer in layers.items():
        replace_module(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)
