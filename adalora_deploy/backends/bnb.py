"""bitsandbytes bases: ``Linear4bit`` (NF4/FP4, optional double quantization) and ``Linear8bitLt`` (LLM.int8).

bitsandbytes is imported only when a module from it is seen, so float-only users never load it.
"""

from __future__ import annotations

import torch
from torch import nn

from adalora_deploy.backends import LinearBackend, register_backend


def _from_bnb(module: nn.Module, class_name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and any(
        cls.__name__ == class_name for cls in type(module).__mro__
    )


class Bnb4bitBackend(LinearBackend):
    """``bnb.nn.Linear4bit``: weight packed two codes per byte, blockwise absmax in ``weight.quant_state``."""

    kind = "bnb-4bit"

    def matches(self, module: nn.Module) -> bool:
        return _from_bnb(module, "Linear4bit")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    def describe(self, module: nn.Module) -> str:
        state = module.weight.quant_state
        double = "-dq" if getattr(state, "nested", False) else ""
        return f"bnb-{state.quant_type}{double}"


class Bnb8bitBackend(LinearBackend):
    """``bnb.nn.Linear8bitLt``: int8 rows ``CB`` with per-row absmax ``SCB``: ``W = CB * SCB / 127``."""

    kind = "bnb-int8"

    def matches(self, module: nn.Module) -> bool:
        return _from_bnb(module, "Linear8bitLt")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        codes = weight.CB if getattr(weight, "CB", None) is not None else weight.data
        if codes.dtype != torch.int8:
            return codes.float()  # not yet quantized (still on its way to the device)
        return codes.float() * (weight.SCB.float().view(-1, 1) / 127.0)


register_backend(Bnb4bitBackend())
register_backend(Bnb8bitBackend())
