"""The source model of an export: the base loaded as in training with the trained adapter injected."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import nn

__all__ = ["adapters_bypassed", "load_source_model", "pin_bnb4_arithmetic"]


def pin_bnb4_arithmetic(model: nn.Module) -> None:
    """Make every bitsandbytes ``Linear4bit`` compute as in training (fp32 dequantize, then matmul).

    On CPUs with AVX512-BF16, bnb's first eval no-grad forward repacks the weight in place and rounds its
    absmax to bfloat16; training (and the exported MatMulBnb4) use the fp32 statistics.
    """
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_source_model(base: str | os.PathLike, adapter: str | os.PathLike, *, quantization: str,
                      double_quant: bool = False) -> nn.Module:
    """The base loaded as ``quantization`` with the adapter injected (compacted), frozen, eval, on CPU.

    bnb 4-bit layers are pinned to the training arithmetic (see :func:`pin_bnb4_arithmetic`).
    """
    from adalora_deploy.config import ModelConfig
    from adalora_deploy.models import load_base_model
    from adalora_deploy.peft_format import load_adapter

    model = load_base_model(ModelConfig(path=str(base), quantization=quantization, double_quant=double_quant,
                                        device="cpu"))
    pin_bnb4_arithmetic(model)
    load_adapter(model, adapter)
    return model.eval()


@contextlib.contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`AdaLoraLinear` of ``model`` is replaced by its base layer."""
    from adalora_deploy.adapters import find_adapters, replace_module

    layers = dict(find_adapters(model).items())
    for name, layer in layers.items():
        replace_module(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)
