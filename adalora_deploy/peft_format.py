"""PEFT's on-disk adapter formats: the one place they are read and written (docs/ALGORITHM.md, PEFT's format).

AdaLoRA adapter folder (what ``peft.PeftModel.from_pretrained`` reads)::

    adapter_config.json          peft_type ADALORA, init_r, ..., rank_pattern {"<module>.lora_E": [bool] * init_r}
    adapter_model.safetensors    base_model.model.<module>.lora_A (r_k, d_in)
                                 base_model.model.<module>.lora_E (r_k, 1)
                                 base_model.model.<module>.lora_B (d_out, r_k)     sliced by rank_pattern

Standard LoRA folder (:func:`write_lora`): ``<module>.lora_A.weight`` / ``.lora_B.weight`` with per-module
``rank_pattern``/``alpha_pattern`` and scaling 1. Folders are written under a temporary name and swapped in
whole; tensors are read with safetensors only.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adalora_deploy import functional as F
from adalora_deploy.adapters import AdapterSet, inject_adapters
from adalora_deploy.artifacts import (
    atomic_dir,
    load_tensors,
    read_json_object,
    save_tensors,
    write_json,
)
from adalora_deploy.compacted import CompactAdapter, CompactLayer, from_adapters
from adalora_deploy.config import PEFT_COMMON_FIELDS, AdaLoraConfig
from adalora_deploy.errors import AdapterMismatchError, ArtifactError, ConfigError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "load_adapter",
    "lora_config_dict",
    "read_adapter",
    "read_adapter_config",
    "read_compact_adapter",
    "read_rank_pattern",
    "save_adapter",
    "write_adalora",
    "write_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --- writing ----------------------------------------------------------------------------------------


def _adalora_tensors(layers: tuple[CompactLayer, ...]) -> dict[str, torch.Tensor]:
    """PEFT's AdaLoRA keys, ``base_model.model.<module>.lora_{A,E,B}``, of sliced layers."""
    tensors = {}
    for layer in layers:
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_A"] = layer.lora_A
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_E"] = layer.lora_E
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_B"] = layer.lora_B
    return tensors


def _with_saved_modules(adapter: CompactAdapter, tensors: dict[str, torch.Tensor],
                        config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Add the ``modules_to_save`` (a classifier's head) as PEFT saves them: ``base_model.model.<module>.<param>``
    (PEFT strips its ``modules_to_save.<adapter name>.`` wrapper prefix on save), listed in ``modules_to_save``."""
    if not adapter.modules_to_save:
        return tensors, config
    tensors = tensors | {f"{PEFT_PREFIX}{key}": value for key, value in adapter.saved.items()}
    config = config | {"modules_to_save": list(adapter.modules_to_save)}
    config.setdefault("adalora_deploy", {})
    if adapter.labels is not None:
        config["adalora_deploy"] = dict(config["adalora_deploy"]) | {"labels": list(adapter.labels)}
    return tensors, config


def _write_folder(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    folder = Path(folder)
    with atomic_dir(folder) as temp:
        save_tensors(temp / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
        write_json(temp / ADAPTER_CONFIG, config)
    return folder


def _adalora_config(adapter: CompactAdapter, layers: tuple[CompactLayer, ...], *, compacted: bool) -> dict[str, Any]:
    """``adapter_config.json`` for ``layers`` of ``adapter`` (PEFT's fields plus our own under ``adalora_deploy``)."""
    config = adapter.config
    if compacted:
        config = dataclasses.replace(config, target_modules=[layer.name for layer in layers])
    peft_config = config.to_peft_dict({f"{layer.name}.lora_E": list(layer.rank_mask) for layer in layers})
    if compacted:
        peft_config["target_modules"] = [layer.name for layer in layers]
    peft_config["fan_in_fan_out"] = adapter.fan_in_fan_out
    peft_config["base_model_name_or_path"] = adapter.base_model_name_or_path
    peft_config["adalora_deploy"] = {
        "config": dataclasses.asdict(config),
        "shapes": {layer.name: [layer.out_features, layer.in_features] for layer in layers},
        **({"compacted": True} if compacted else {}),
    }
    return peft_config


def save_adapter(adapters: AdapterSet, config: AdaLoraConfig, folder: str | Path,
                 base_model_name_or_path: str | None = None, *, model: nn.Module | None = None,
                 modules_to_save: tuple[str, ...] = (), labels: tuple[str, ...] | None = None) -> Path:
    """Write a model's adapters in PEFT's AdaLoRA format (loadable by ``PeftModel.from_pretrained``).

    Every adapted module is written (rank-0 ones with empty tensors, as PEFT does), sliced by its mask; a
    classifier's ``modules_to_save`` (read from ``model``) and label names go with them.
    """
    adapter = from_adapters(adapters, config, base_model_name_or_path, model=model, modules_to_save=modules_to_save,
                            labels=labels)
    tensors, peft_config = _with_saved_modules(
        adapter, _adalora_tensors(adapter.layers), _adalora_config(adapter, adapter.layers, compacted=False))
    return _write_folder(folder, tensors, peft_config)


def _check_not_empty(adapter: CompactAdapter) -> None:
    if not adapter.live_layers():
        raise ArtifactError("every adapted layer was pruned to rank 0: the adapter is empty, nothing to write "
                            "(use the base model as it is)")


def write_adalora(adapter: CompactAdapter, folder: str | Path) -> Path:
    """Write ``adapter`` in PEFT's AdaLoRA format, tensors at the surviving ranks.

    Rank-0 layers are left out of the tensors, the rank_pattern and ``target_modules`` (a list of the
    exact module names that keep an adapter; PEFT matches list entries literally).

    Raises:
        ArtifactError: every layer has rank 0.
    """
    _check_not_empty(adapter)
    live = adapter.live_layers()
    tensors, config = _with_saved_modules(adapter, _adalora_tensors(live), _adalora_config(adapter, live, compacted=True))
    return _write_folder(folder, tensors, config)


def lora_config_dict(adapter: CompactAdapter) -> dict:
    """PEFT's LoRA ``adapter_config.json`` for ``adapter``: per-module ranks, scaling 1 everywhere.

    ``r``/``lora_alpha`` are the most common rank; ``rank_pattern``/``alpha_pattern`` name every module
    (regex-escaped full name, which PEFT matches as ``(.*\\.)?(key)$``) with ``alpha_k = r_k``.
    """
    live = adapter.live_layers()
    ranks = [layer.rank for layer in live]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    pattern = {re.escape(layer.name): layer.rank for layer in live}
    return {
        "peft_type": "LORA",
        "task_type": adapter.config.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": adapter.config.lora_dropout,
        "target_modules": [layer.name for layer in live],
        "fan_in_fan_out": adapter.fan_in_fan_out,
        **PEFT_COMMON_FIELDS,
    }


def write_lora(adapter: CompactAdapter, folder: str | Path) -> Path:
    """Write ``adapter`` as a standard PEFT LoRA adapter with per-module ranks and scaling 1.

    ``lora_A = Λ' * Q'`` (r_k, d_in), ``lora_B = P' * scale`` (d_out, r_k): ``B @ A`` is exactly the
    AdaLoRA ΔW (up to float rounding of the two products). Rank-0 layers are left out.

    Raises:
        ArtifactError: every layer has rank 0.
    """
    _check_not_empty(adapter)
    tensors = {}
    for layer in adapter.live_layers():
        lora_A, lora_B = layer.lora_factors()
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_A.weight"] = lora_A
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_B.weight"] = lora_B
    return _write_folder(folder, *_with_saved_modules(adapter, tensors, lora_config_dict(adapter)))


# --- reading ----------------------------------------------------------------------------------------


def _read_config(folder: Path) -> tuple[dict[str, Any], AdaLoraConfig, dict[str, list[bool]] | None]:
    data = read_json_object(folder, ADAPTER_CONFIG, "adapter")
    extra = data.get("adalora_deploy", {}).get("config", {}) if isinstance(data.get("adalora_deploy"), dict) else {}
    config, rank_pattern = AdaLoraConfig.from_peft_dict(data)
    if extra:
        options = {k: extra[k] for k in ("regularizer", "schedule", "compact_in_training", "down_weights") if k in extra}
        config = dataclasses.replace(config, **options)
    return data, config, rank_pattern


def _read(folder: Path) -> tuple[dict[str, Any], AdaLoraConfig, dict[str, list[bool]] | None, dict[str, torch.Tensor]]:
    data, config, rank_pattern = _read_config(folder)
    return data, config, rank_pattern, load_tensors(folder / ADAPTER_WEIGHTS)


def read_adapter(folder: str | Path) -> tuple[AdaLoraConfig, dict[str, list[bool]] | None, dict[str, torch.Tensor]]:
    """Read an AdaLoRA adapter folder (ours or PEFT's): config, rank_pattern and PEFT-keyed tensors."""
    _, config, rank_pattern, tensors = _read(Path(folder))
    return config, rank_pattern, tensors


def read_adapter_config(folder: str | Path) -> AdaLoraConfig:
    """The adapter's config (PEFT's fields and our own options), without reading its tensors."""
    return _read_config(Path(folder))[1]


def read_labels(folder: str | Path) -> tuple[str, ...] | None:
    """A classifier adapter's label names in logit order (``None``: a causal LM's adapter)."""
    data = read_json_object(Path(folder), ADAPTER_CONFIG, "adapter")
    own = data.get("adalora_deploy") if isinstance(data.get("adalora_deploy"), dict) else {}
    labels = own.get("labels")
    return tuple(str(label) for label in labels) if isinstance(labels, list) else None


def read_rank_pattern(folder: str | Path) -> tuple[AdaLoraConfig, dict[str, tuple[bool, ...]]]:
    """The adapter's config and which of its init_r triplets each module keeps, by module name.

    Modules come in the order the folder lists them (the model's order, for adapters written by us or
    PEFT). A folder saved without a rank_pattern (PEFT, before the final allocation step) keeps the
    triplets with Λ != 0, as :func:`read_compact_adapter` reads it.

    Raises:
        ArtifactError: missing/corrupt files.
    """
    folder = Path(folder)
    _, config, rank_pattern = _read_config(folder)
    if rank_pattern is None:
        return config, {layer.name: layer.rank_mask for layer in read_compact_adapter(folder).layers}
    return config, {key.removesuffix(".lora_E"): tuple(bool(v) for v in mask) for key, mask in rank_pattern.items()}


def _slice_with_mask(name: str, mask: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor,
                     lora_B: torch.Tensor, scale: float) -> CompactLayer:
    lora_A, lora_E, lora_B = F.slice_triplets(lora_A, lora_E, lora_B, mask)
    return CompactLayer(name=name, rank_mask=tuple(bool(v) for v in mask.tolist()), lora_A=lora_A.detach().clone(),
                        lora_E=lora_E.detach().clone(), lora_B=lora_B.detach().clone(), scale=scale)


def read_compact_adapter(folder: str | Path) -> CompactAdapter:
    """Read an AdaLoRA adapter folder (ours or PEFT's) and slice it to its surviving triplets.

    Three cases, by what the folder holds for a module:

    * rank_pattern entry and tensors at the pattern's rank (PEFT slices on save; so do we): taken as is.
    * rank_pattern entry and tensors at init_r: sliced by the pattern.
    * no rank_pattern (PEFT saves ``rank_pattern: null`` before the final allocation step): tensors are
      at init_r and masked triplets have Λ exactly 0, so the triplets with Λ != 0 are kept. Dropping a
      triplet with Λ = 0 leaves ΔW unchanged, so this is exact.

    Raises:
        ArtifactError: missing/corrupt files, tensors missing for a module or shapes that disagree.
    """
    folder = Path(folder)
    data, config, rank_pattern, tensors = _read(folder)
    names = sorted({key[len(PEFT_PREFIX):].rsplit(".", 1)[0] for key in tensors
                    if key.startswith(PEFT_PREFIX) and key.endswith((".lora_A", ".lora_E", ".lora_B"))})
    if not names:
        raise ArtifactError(f"{folder / ADAPTER_WEIGHTS} has no AdaLoRA tensors (base_model.model.<module>.lora_A)")
    scale = F.adapter_scale(config.lora_alpha, config.init_r)
    layers = []
    for name in names:
        parts = [tensors.get(f"{PEFT_PREFIX}{name}.lora_{k}") for k in "AEB"]
        if any(p is None for p in parts):
            raise ArtifactError(f"adapter {folder}: {name} lacks one of lora_A, lora_E, lora_B")
        lora_A, lora_E, lora_B = parts
        rank = lora_E.shape[0]
        if lora_E.dim() != 2 or lora_E.shape[1] != 1 or lora_A.shape[0] != rank or lora_B.shape[1] != rank:
            raise ArtifactError(f"adapter {folder}: {name} has inconsistent shapes lora_A {tuple(lora_A.shape)}, "
                                f"lora_E {tuple(lora_E.shape)}, lora_B {tuple(lora_B.shape)}")
        pattern = (rank_pattern or {}).get(f"{name}.lora_E")
        if pattern is None:
            if rank != config.init_r:
                raise ArtifactError(f"adapter {folder}: {name} has rank {rank} but no rank_pattern entry and "
                                    f"init_r = {config.init_r}")
            mask = lora_E.view(-1) != 0
            layers.append(_slice_with_mask(name, mask, lora_A, lora_E, lora_B, scale))
            continue
        mask = torch.tensor(pattern, dtype=torch.bool)
        if mask.numel() != config.init_r:
            raise ArtifactError(f"adapter {folder}: rank_pattern of {name} has {mask.numel()} entries, "
                                f"init_r = {config.init_r}")
        if rank == config.init_r and int(mask.sum()) != rank:
            layers.append(_slice_with_mask(name, mask, lora_A, lora_E, lora_B, scale))
        elif rank == int(mask.sum()):
            layers.append(CompactLayer(name=name, rank_mask=tuple(bool(v) for v in mask.tolist()), lora_A=lora_A,
                                       lora_E=lora_E, lora_B=lora_B, scale=scale))
        else:
            raise ArtifactError(f"adapter {folder}: {name} has rank {rank}, its rank_pattern keeps "
                                f"{int(mask.sum())} of {config.init_r}")
    base = data.get("base_model_name_or_path")
    modules_to_save = tuple(data.get("modules_to_save") or ())
    saved = {key[len(PEFT_PREFIX):]: value for key, value in tensors.items() if key.startswith(PEFT_PREFIX)
             and any(key[len(PEFT_PREFIX):].startswith(module + ".") for module in modules_to_save)}
    if modules_to_save and not saved:
        raise ArtifactError(f"adapter {folder}: modules_to_save lists {', '.join(modules_to_save)} but "
                            f"{ADAPTER_WEIGHTS} holds none of their weights")
    own = data.get("adalora_deploy") if isinstance(data.get("adalora_deploy"), dict) else {}
    labels = own.get("labels")
    return CompactAdapter(config=config, layers=tuple(layers), fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
                          base_model_name_or_path=base if isinstance(base, str) else None,
                          modules_to_save=modules_to_save, saved=saved,
                          labels=tuple(str(label) for label in labels) if isinstance(labels, list) else None)


def load_adapter(model: nn.Module, folder: str | Path) -> tuple[AdapterSet, AdaLoraConfig]:
    """Inject an AdaLoRA adapter saved in PEFT's format into ``model`` (frozen, eval-ready).

    Layers come back compacted to their surviving triplets (:func:`read_compact_adapter`: exactly what
    PEFT loads, and for an adapter saved without a rank_pattern the triplets with Λ != 0, the same ΔW).

    Raises:
        AdapterMismatchError: a module of the adapter is missing from the model or has another shape.
        ArtifactError: missing, corrupt or inconsistent adapter files.
    """
    adapter = read_compact_adapter(folder)
    names = [layer.name for layer in adapter.layers]
    module_names = {name for name, _ in model.named_modules()}
    missing = [n for n in names if n not in module_names]
    if missing:
        raise AdapterMismatchError(f"adapter {folder} was trained for another base: module {missing[0]} is not in "
                                   f"this model ({len(missing)} of {len(names)} adapter modules missing)")
    exact = "|".join(re.escape(n) for n in names)
    try:
        adapters = inject_adapters(model, dataclasses.replace(adapter.config, target_modules=f"(?:{exact})"))
    except ConfigError as error:
        raise AdapterMismatchError(f"adapter {folder} does not fit this model: {error}") from None
    by_name = {layer.name: layer for layer in adapter.layers}
    for name, layer in adapters.items():
        saved = by_name[name]
        try:
            layer.load_compacted(torch.tensor(saved.rank_mask, dtype=torch.bool), saved.lora_A, saved.lora_E,
                                 saved.lora_B)
        except ValueError as error:
            raise AdapterMismatchError(f"adapter {folder} does not fit this model at {name}: {error}") from None
        layer.requires_grad_(False)
    load_saved_modules(model, adapter, folder)
    return adapters, adapter.config


def load_saved_modules(model: nn.Module, adapter: CompactAdapter, folder: str | Path) -> None:
    """Copy an adapter's ``modules_to_save`` tensors (a classifier's trained head) into ``model``.

    Raises:
        AdapterMismatchError: a saved tensor names no parameter or buffer of ``model``, or has another shape.
    """
    if not adapter.saved:
        return  # a causal LM's adapter: nothing trained in full (and no state_dict of a quantized model built)
    state = model.state_dict()
    for key, value in adapter.saved.items():
        if key not in state or state[key].shape != value.shape:
            raise AdapterMismatchError(f"adapter {folder} does not fit this model: its saved {key} "
                                       f"{tuple(value.shape)} is {'not in it' if key not in state else 'shaped ' + str(tuple(state[key].shape))}")
        with torch.no_grad():
            state[key].copy_(value)  # state_dict tensors share the parameters' storage
