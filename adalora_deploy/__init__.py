"""adalora-deploy: AdaLoRA on quantized bases, compacted to surviving ranks, exported to ONNX.

The public API, one import away::

    from adalora_deploy import AdaLoraConfig, inject_adapters, AdaLoraTrainer, save_adapter, load_adapter

Names resolve lazily (PEP 562): ``transformers.Trainer`` alone costs seconds of imports (it pulls in
peft and bitsandbytes), so nothing heavy loads until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "adalora_deploy.adapters": ["AdapterSet", "find_adapters", "inject_adapters"],
    "adalora_deploy.allocator": ["AllocationStep", "RankAllocator"],
    "adalora_deploy.peft_format": ["load_adapter", "read_adapter", "read_compact_adapter", "save_adapter"],
    "adalora_deploy.compacted": ["CompactAdapter"],
    "adalora_deploy.compaction": ["compact_adapter", "compact_in_place"],
    "adalora_deploy.config": ["AdaLoraConfig", "RunConfig", "load_run_config"],
    "adalora_deploy.errors": ["AdapterMismatchError", "ConfigError", "UnsupportedLayerError", "UserError"],
    "adalora_deploy.layer": ["AdaLoraLinear"],
    "adalora_deploy.merge": ["merge_adapter", "merge_into_dense"],
    "adalora_deploy.regularizer": ["orthogonal_regularizer"],
    "adalora_deploy.training": ["AdaLoraCallback", "AdaLoraController", "AdaLoraTrainer", "TrainResult", "train"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'adalora_deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
