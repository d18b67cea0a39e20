"""The GPTQ backend: how an adapter reads our pure-torch :class:`~adalora_deploy.gptq.linear.QuantLinear`.

The layer itself, its checkpoint tensors and its forward live in :mod:`adalora_deploy.gptq.linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from adalora_deploy.backends import LinearBackend, register_backend
from adalora_deploy.gptq.linear import QuantLinear, quant_linears

__all__ = ["GPTQBackend", "QuantLinear", "quant_linears"]


class GPTQBackend(LinearBackend):
    """Our pure-torch GPTQ :class:`QuantLinear`."""

    name = "gptq"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, QuantLinear)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize_weight()

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None if module.bias is None else module.bias.detach().float()

    def describe(self, module: nn.Module) -> str:
        group = "all" if module.group_size == -1 else str(module.group_size)
        return f"gptq-{module.bits}bit-g{group}{'-asym' if not module.sym else ''}{'-act' if module.desc_act else ''}"


register_backend(GPTQBackend())
