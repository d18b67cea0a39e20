"""Injecting AdaLoRA layers into a model and finding them again.

Modules are matched by ``target_modules`` exactly as PEFT matches them: a string is a regex that must
match the whole module name; a list matches a name equal to an entry or ending in ``"." + entry``.
After injection only adapter parameters are trainable. Adapters are found afterwards by walking the
module tree for :class:`AdaLoraLinear` instances, never by parsing parameter names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from adalora_deploy.architectures import UnsupportedArchitectureError, default_target_modules
from adalora_deploy.backends import UnsupportedLayerError, is_supported
from adalora_deploy.config import AdaLoraConfig, ConfigError
from adalora_deploy.layer import AdaLoraLinear

__all__ = ["AdapterSet", "find_adapters", "inject_adapters", "matches_target", "replace_module", "resolve_target_modules"]

logger = logging.getLogger(__name__)


def matches_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: regex full match for a string; equal or ``.``-suffix match for a list."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in target_modules)


def resolve_target_modules(model: nn.Module, config: AdaLoraConfig) -> list[str] | str:
    """``config.target_modules``, or the architecture's default (:mod:`adalora_deploy.architectures`) when None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        targets = default_target_modules(model_type)
    except UnsupportedArchitectureError:
        raise ConfigError(f"adapter.target_modules = None: no default for model_type {model_type!r}; "
                          "list the module names to adapt, e.g. [q_proj, v_proj]") from None
    logger.info("adapter.target_modules not set: using the %s default %s", model_type, targets)
    return targets


@dataclass(frozen=True)
class AdapterSet(Mapping[str, AdaLoraLinear]):
    """The adapted layers of one model, by module name, in module order."""

    layers: dict[str, AdaLoraLinear]

    def __getitem__(self, name: str) -> AdaLoraLinear:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (Q, Λ, P of each layer), in a stable order."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]

    def rank_pattern(self) -> dict[str, list[bool]]:
        """PEFT's rank_pattern: ``{"<module>.lora_E": [kept] * init_r}`` from each layer's mask."""
        return {f"{name}.lora_E": layer.rank_mask.tolist() for name, layer in self.layers.items()}

    def live_ranks(self) -> dict[str, int]:
        """Triplets kept by the current mask, per module."""
        return {name: layer.live_rank for name, layer in self.layers.items()}


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` inside ``root``; returns the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def find_adapters(model: nn.Module) -> AdapterSet:
    """All :class:`AdaLoraLinear` layers in ``model``."""
    return AdapterSet({name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLinear)})


def inject_adapters(model: nn.Module, config: AdaLoraConfig, seed: int = 0) -> AdapterSet:
    """Wrap every module matching ``config.target_modules`` in an :class:`AdaLoraLinear`, in place.

    Every other parameter of the model is frozen. The adapters start with Λ = 0, so the model's output
    is unchanged until training moves Λ.

    Raises:
        ConfigError: ``target_modules`` matches no module of the model.
        UnsupportedLayerError: a matched module is not a linear layer we support.
    """
    if find_adapters(model):
        raise ValueError("model already has AdaLoRA adapters; inject once")
    targets = resolve_target_modules(model, config)
    names = [name for name, _ in model.named_modules() if name and matches_target(name, targets)]
    if not names:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_supported(m)})
        raise ConfigError(f"adapter.target_modules = {targets!r}: matches no module of the model; "
                          f"its linear layers are named {', '.join(linear[:12]) or '(none)'}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        try:
            layer = AdaLoraLinear(model.get_submodule(name), config.init_r, config.lora_alpha, config.lora_dropout,
                                  generator=generator, down_weights=config.down_weights)
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"{name}: {error}") from None
        replace_module(model, name, layer)
        layers[name] = layer
    return AdapterSet(layers)
