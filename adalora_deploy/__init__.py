"""adalora-deploy: AdaLoRA on quantized bases, compacted to surviving ranks, exported to ONNX.

The public API, one import away::

    from adalora_deploy import AdaLoraConfig, inject_adapters, AdaLoraTrainer, save_adapter, load_adapter
"""

from adalora_deploy.adapters import AdapterSet, find_adapters, inject_adapters
from adalora_deploy.allocator import AllocationStep, RankAllocator
from adalora_deploy.backends import UnsupportedLayerError
from adalora_deploy.checkpoint import AdapterMismatchError, load_adapter, read_adapter, save_adapter
from adalora_deploy.config import AdaLoraConfig, ConfigError, RunConfig, load_run_config
from adalora_deploy.layer import AdaLoraLinear
from adalora_deploy.regularizer import orthogonal_regularizer
from adalora_deploy.training import AdaLoraCallback, AdaLoraController, AdaLoraTrainer, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraController",
    "AdaLoraLinear",
    "AdaLoraTrainer",
    "AdapterMismatchError",
    "AdapterSet",
    "AllocationStep",
    "ConfigError",
    "RankAllocator",
    "RunConfig",
    "TrainResult",
    "UnsupportedLayerError",
    "find_adapters",
    "inject_adapters",
    "load_adapter",
    "load_run_config",
    "orthogonal_regularizer",
    "read_adapter",
    "save_adapter",
    "train",
]
