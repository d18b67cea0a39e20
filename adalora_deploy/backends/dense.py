"""Dense float bases: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's fan_in_fan_out layout)."""

from __future__ import annotations

import torch
from torch import nn

from adalora_deploy.backends import LinearBackend, register_backend


class DenseBackend(LinearBackend):
    """``nn.Linear``: weight ``(out, in)``."""

    name = "dense"

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()


class Conv1DBackend(LinearBackend):
    """transformers ``Conv1D``: ``y = x @ W + b`` with weight stored ``(in, out)`` (fan_in_fan_out)."""

    name = "dense-conv1d"

    def matches(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)

    def features(self, module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return in_features, out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float().t()


register_backend(DenseBackend())
register_backend(Conv1DBackend())
