"""A compacted adapter: the surviving triplets of every adapted module, independent of any model.

    Q' = Q[keep, :]    Λ' = Λ[keep]    P' = P[:, keep]    scale unchanged (alpha / (init_r + 1e-5))

These are the types that :mod:`adalora_deploy.compaction` produces and :mod:`adalora_deploy.peft_format`
reads and writes; they live here so that neither of those two modules imports the other's callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adalora_deploy import functional as F
from adalora_deploy.adapters import AdapterSet
from adalora_deploy.config import AdaLoraConfig

__all__ = ["CompactAdapter", "CompactLayer", "from_adapters"]


@dataclass(frozen=True, eq=False)
class CompactLayer:
    """The surviving triplets of one adapted module.

    Attributes:
        name: module name in the base model (e.g. ``model.layers.0.self_attn.q_proj``).
        rank_mask: which of the init_r triplets survive (length init_r).
        lora_A: Q', ``(r_k, d_in)``.
        lora_E: Λ', ``(r_k, 1)``.
        lora_B: P', ``(d_out, r_k)``.
        scale: ``lora_alpha / (init_r + 1e-5)``, unchanged by compaction.
    """

    name: str
    rank_mask: tuple[bool, ...]
    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor
    scale: float

    @property
    def init_r(self) -> int:
        """Rank the layer was trained from."""
        return len(self.rank_mask)

    @property
    def rank(self) -> int:
        """Surviving rank r_k."""
        return int(self.lora_E.shape[0])

    @property
    def in_features(self) -> int:
        """d_in."""
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        """d_out."""
        return int(self.lora_B.shape[0])

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard LoRA factors with scaling 1: ``(Λ' * Q' (r_k, d_in), P' * scale (d_out, r_k))``.

        Computed and returned in float32 (PEFT keeps adapter weights in float32 by default), so folding
        Λ and the scale in adds no half-precision rounding.
        """
        return F.lora_factors(self.lora_A.float(), self.lora_E.float(), self.lora_B.float(), self.scale)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = P' (Λ' * Q') * scale``, ``(d_out, d_in)``, float32."""
        return F.adapter_delta(self.lora_A.float(), self.lora_E.float(), self.lora_B.float(), self.scale)


@dataclass(frozen=True, eq=False)
class CompactAdapter:
    """A whole adapter sliced to its surviving triplets, independent of any model.

    Attributes:
        config: the AdaLoRA config it was trained with (init_r and lora_alpha define the scale).
        layers: every adapted module, rank-0 ones included (they are dropped when written).
        fan_in_fan_out: the base layers store their weight ``(in, out)`` (GPT-2's Conv1D).
        base_model_name_or_path: recorded in the written adapter_config.json.
        modules_to_save: PEFT's ``modules_to_save``: modules trained in full (a classifier's head), by name.
        saved: their tensors, by full parameter name in the model (``classifier.weight``); carried unchanged
            by compaction.
        labels: a classifier's label names, in logit order (None for a causal LM).
    """

    config: AdaLoraConfig
    layers: tuple[CompactLayer, ...]
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    modules_to_save: tuple[str, ...] = ()
    saved: Mapping[str, torch.Tensor] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None

    def live_layers(self) -> tuple[CompactLayer, ...]:
        """Layers that keep at least one triplet."""
        return tuple(layer for layer in self.layers if layer.rank > 0)

    def rank_pattern(self) -> dict[str, list[bool]]:
        """PEFT's AdaLoRA rank_pattern of the layers that survive."""
        return {f"{layer.name}.lora_E": list(layer.rank_mask) for layer in self.live_layers()}


def from_adapters(adapters: AdapterSet, config: AdaLoraConfig,
                  base_model_name_or_path: str | None = None, *, model: torch.nn.Module | None = None,
                  modules_to_save: tuple[str, ...] = (), labels: tuple[str, ...] | None = None) -> CompactAdapter:
    """The surviving triplets of an in-memory model's adapters (masked or already compacted).

    Args:
        adapters: the model's adapted layers.
        config: the AdaLoRA config they were injected with.
        base_model_name_or_path: recorded in the written adapter_config.json.
        model: the model, whose ``modules_to_save`` parameters are saved (required with ``modules_to_save``).
        modules_to_save: modules trained in full; labels: a classifier's label names.
    """
    saved = {}
    for module in modules_to_save:
        if model is None:
            raise ValueError("from_adapters: modules_to_save needs the model")
        for key, value in model.get_submodule(module).state_dict().items():
            saved[f"{module}.{key}"] = value.detach().clone().cpu().contiguous()
    layers = []
    fan_in_fan_out = False
    for name, layer in adapters.items():
        lora_A, lora_E, lora_B = layer.live_factors()
        layers.append(CompactLayer(name=name, rank_mask=tuple(bool(v) for v in layer.rank_mask.tolist()),
                                   lora_A=lora_A.clone().cpu(), lora_E=lora_E.clone().cpu(),
                                   lora_B=lora_B.clone().cpu(), scale=layer.scale))
        fan_in_fan_out |= layer.backend.name == "dense-conv1d"
    return CompactAdapter(config=config, layers=tuple(layers), fan_in_fan_out=fan_in_fan_out,
                          base_model_name_or_path=base_model_name_or_path, modules_to_save=tuple(modules_to_save),
                          saved=saved, labels=tuple(labels) if labels is not None else None)
