"""Base-linear backends: how each kind of frozen base layer is read.

An adapter never looks inside its base layer. It calls the base module's own forward and, when it
needs the weight (merging, export, error reports), asks the backend registered for that module's type.
One backend per base kind, one file each:

    dense.py   torch.nn.Linear, transformers Conv1D (GPT-2, weight stored (in, out))
    bnb.py     bitsandbytes Linear4bit (NF4/FP4, double quant) and Linear8bitLt (LLM.int8)
    gptq.py    our pure-torch GPTQ QuantLinear

A backend is stateless. ``backend_for(module)`` finds the one that claims a module and raises
:class:`UnsupportedLayerError` naming the module's type when none does.
"""

from __future__ import annotations

import abc
import importlib
from typing import ClassVar

import torch
from torch import nn

from adalora_deploy.errors import UnsupportedLayerError

__all__ = ["LinearBackend", "UnsupportedLayerError", "backend_for", "is_supported", "register_backend"]


class LinearBackend(abc.ABC):
    """How to read one type of base linear layer.

    Attributes:
        name: the backend's name, the layer type it reads (``"dense"``, ``"dense-conv1d"``, ``"bnb-4bit"``,
            ``"bnb-int8"``, ``"gptq"``). Not the model's quantization (:mod:`adalora_deploy.quantization`)
            and not the layer's exact base kind (:meth:`describe`).
    """

    name: ClassVar[str]

    @property
    def kind(self) -> str:
        """The former name of :attr:`name`, still read by the export package."""
        return self.name

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this backend handles ``module``."""

    @abc.abstractmethod
    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the layer as ``y = x @ W.T`` sees it."""

    @abc.abstractmethod
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, ``(out_features, in_features)``, float32, on its device."""

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        """The layer's bias ``(out_features,)`` or None."""
        bias = getattr(module, "bias", None)
        return None if bias is None else bias.detach()

    def describe(self, module: nn.Module) -> str:
        """The base kind of this particular module (e.g. ``"bnb-nf4"`` vs ``"bnb-fp4"``): what manifests record."""
        return self.name


# Modules that hold backends, in lookup order. bnb is optional at import time: its module imports
# bitsandbytes lazily inside ``matches`` so a missing install only matters for bnb layers.
_BACKEND_MODULES = ("adalora_deploy.backends.gptq", "adalora_deploy.backends.bnb", "adalora_deploy.backends.dense")
_registry: list[LinearBackend] = []
_loaded = False


def register_backend(backend: LinearBackend) -> LinearBackend:
    """Add a backend; later registrations are consulted first."""
    _registry.insert(0, backend)
    return backend


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in reversed(_BACKEND_MODULES):
        importlib.import_module(name)


def backend_for(module: nn.Module) -> LinearBackend:
    """The backend for ``module``; raises :class:`UnsupportedLayerError` if none handles it."""
    _ensure_loaded()
    for backend in _registry:
        if backend.matches(module):
            return backend
    kinds = ", ".join(sorted({b.name for b in _registry}))
    raise UnsupportedLayerError(
        f"cannot adapt a {type(module).__module__}.{type(module).__name__}: supported base layers are {kinds} "
        "(nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt, GPTQ QuantLinear)"
    )


def is_supported(module: nn.Module) -> bool:
    """Whether some backend handles ``module``."""
    _ensure_loaded()
    return any(b.matches(module) for b in _registry)
