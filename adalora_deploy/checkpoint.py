"""On-disk formats: PEFT's AdaLoRA adapter, and our resumable training checkpoint.

PEFT adapter folder (what ``peft.PeftModel.from_pretrained`` reads)::

    adapter_config.json          peft_type ADALORA, init_r, ..., rank_pattern {"<module>.lora_E": [bool] * init_r}
    adapter_model.safetensors    base_model.model.<module>.lora_A (r_k, d_in)
                                 base_model.model.<module>.lora_E (r_k, 1)
                                 base_model.model.<module>.lora_B (d_out, r_k)     sliced by rank_pattern

Training checkpoint folder (safetensors and JSON only; nothing is ever unpickled)::

    state.json                   step, config, optimizer hyper-parameters, allocator flags, RNG bookkeeping
    tensors.safetensors          adapter state (incl. masks), allocator EMAs, optimizer moments, RNG states

Both are written to a temporary folder and swapped into place whole.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adalora_deploy.adapters import AdapterSet, inject_adapters
from adalora_deploy.artifacts import (
    ArtifactError,
    atomic_dir,
    load_tensors,
    read_json,
    read_json_object,
    save_tensors,
    write_json,
)
from adalora_deploy.config import AdaLoraConfig, ConfigError

from adalora_deploy.errors import AdapterMismatchError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterMismatchError",
    "adapter_state_dict",
    "load_adapter",
    "load_training_checkpoint",
    "read_adapter",
    "save_adapter",
    "save_training_checkpoint",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(adapters: AdapterSet) -> dict[str, torch.Tensor]:
    """PEFT's keys and slicing: the live triplets of each layer, ``base_model.model.<module>.lora_{A,E,B}``."""
    tensors = {}
    for name, layer in adapters.items():
        lora_A, lora_E, lora_B = layer.live_factors()
        tensors[f"{PEFT_PREFIX}{name}.lora_A"] = lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_E"] = lora_E
        tensors[f"{PEFT_PREFIX}{name}.lora_B"] = lora_B
    return tensors


def save_adapter(adapters: AdapterSet, config: AdaLoraConfig, folder: str | Path,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in PEFT's AdaLoRA format (loadable by ``PeftModel.from_pretrained``)."""
    folder = Path(folder)
    peft_config = config.to_peft_dict(adapters.rank_pattern())
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    peft_config["adalora_deploy"] = {"config": dataclasses.asdict(config),
                                     "shapes": {n: [l.out_features, l.in_features] for n, l in adapters.items()}}
    with atomic_dir(folder) as temp:
        save_tensors(temp / ADAPTER_WEIGHTS, adapter_state_dict(adapters), metadata={"format": "pt"})
        write_json(temp / ADAPTER_CONFIG, peft_config)
    return folder


def read_adapter(folder: str | Path) -> tuple[AdaLoraConfig, dict[str, list[bool]] | None, dict[str, torch.Tensor]]:
    """Read an AdaLoRA adapter folder (ours or PEFT's): config, rank_pattern and PEFT-keyed tensors."""
    folder = Path(folder)
    data = read_json_object(folder, ADAPTER_CONFIG, "adapter")
    extra = data.get("adalora_deploy", {}).get("config", {}) if isinstance(data.get("adalora_deploy"), dict) else {}
    config, rank_pattern = AdaLoraConfig.from_peft_dict(data)
    if extra:
        options = {k: extra[k] for k in ("regularizer", "schedule", "compact_in_training") if k in extra}
        config = dataclasses.replace(config, **options)
    tensors = load_tensors(folder / ADAPTER_WEIGHTS)
    return config, rank_pattern, tensors


def load_adapter(model: nn.Module, folder: str | Path) -> tuple[AdapterSet, AdaLoraConfig]:
    """Inject an AdaLoRA adapter saved in PEFT's format into ``model`` (frozen, eval-ready).

    Layers come back compacted to their rank_pattern (exactly what PEFT loads); an adapter saved
    without a rank_pattern loads at init_r.

    Raises:
        AdapterMismatchError: a module of the adapter is missing from the model or has another shape.
    """
    config, rank_pattern, tensors = read_adapter(folder)
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(PEFT_PREFIX)})
    if not names:
        raise ArtifactError(f"{Path(folder) / ADAPTER_WEIGHTS} has no AdaLoRA tensors (base_model.model.*.lora_A)")
    module_names = {name for name, _ in model.named_modules()}
    missing = [n for n in names if n not in module_names]
    if missing:
        raise AdapterMismatchError(f"adapter {folder} was trained for another base: module {missing[0]} is not in "
                                   f"this model ({len(missing)} of {len(names)} adapter modules missing)")
    exact = "|".join(re.escape(n) for n in names)
    try:
        adapters = inject_adapters(model, dataclasses.replace(config, target_modules=f"(?:{exact})"))
    except ConfigError as error:
        raise AdapterMismatchError(f"adapter {folder} does not fit this model: {error}") from None
    for name, layer in adapters.items():
        parts = [tensors.get(f"{PEFT_PREFIX}{name}.lora_{k}") for k in "AEB"]
        if any(p is None for p in parts):
            raise ArtifactError(f"adapter {folder}: {name} lacks one of lora_A, lora_E, lora_B")
        pattern = (rank_pattern or {}).get(f"{name}.lora_E")
        mask = torch.tensor(pattern, dtype=torch.bool) if pattern is not None else torch.ones(config.init_r, dtype=torch.bool)
        try:
            layer.load_compacted(mask, *parts)
        except ValueError as error:
            raise AdapterMismatchError(f"adapter {folder} does not fit this model at {name}: {error}") from None
        layer.requires_grad_(False)
    return adapters, config


# --- training checkpoint ---------------------------------------------------------------------------


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(folder: str | Path, *, step: int, adapters: AdapterSet, optimizer: torch.optim.Optimizer,
                             allocator_state: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Everything a resumed run needs to continue exactly: adapters, allocator, optimizer and RNG states.

    ``step`` is the number of optimizer steps completed.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapters.items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                tensors[f"adapter.{name}.{key}"] = value
    for kind in ("exp_avg_ipt", "exp_avg_unc"):
        for index, value in enumerate(allocator_state[kind]):
            tensors[f"allocator.{kind}.{index}"] = value
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = value
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    meta = {
        "step": step,
        "optimizer": optimizer_meta,
        "allocator": {k: v for k, v in allocator_state.items() if k not in ("exp_avg_ipt", "exp_avg_unc")},
        "allocator_ema_count": len(allocator_state["exp_avg_ipt"]),
        "rng": {"python": _jsonable(random.getstate()), "numpy": [numpy_state[0], *map(_plain, numpy_state[2:])]},
        "extra": dict(extra or {}),
    }
    with atomic_dir(folder) as temp:
        save_tensors(temp / "tensors.safetensors", tensors)
        write_json(temp / "state.json", meta)


def load_training_checkpoint(folder: str | Path, *, adapters: AdapterSet,
                             optimizer_factory) -> tuple[int, torch.optim.Optimizer, dict[str, Any], dict[str, Any]]:
    """Restore a checkpoint written by :func:`save_training_checkpoint`.

    Adapter state is loaded first (compacting layers that were compacted when saved), then the optimizer
    is built by ``optimizer_factory(adapters)`` over the restored parameters and given its state.

    Returns:
        ``(step, optimizer, allocator_state, extra)``.
    """
    folder = Path(folder)
    meta = read_json(folder / "state.json")
    tensors = load_tensors(folder / "tensors.safetensors")
    for name, layer in adapters.items():
        prefix = f"adapter.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise AdapterMismatchError(f"checkpoint {folder} has no state for adapter {name}")
        if bool(state["compacted"]):
            layer.load_compacted(state["rank_mask"], state["lora_A"], state["lora_E"], state["lora_B"])
        else:
            with torch.no_grad():
                for key in ("lora_A", "lora_E", "lora_B"):
                    if getattr(layer, key).shape != state[key].shape:
                        raise AdapterMismatchError(f"checkpoint {folder}: {name}.{key} has shape "
                                                   f"{tuple(state[key].shape)}, model has {tuple(getattr(layer, key).shape)}")
                    getattr(layer, key).copy_(state[key])
                layer.rank_mask.copy_(state["rank_mask"])
    optimizer = optimizer_factory(adapters)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    count = meta["allocator_ema_count"]
    allocator_state = dict(meta["allocator"])
    allocator_state["exp_avg_ipt"] = [tensors[f"allocator.exp_avg_ipt.{i}"] for i in range(count)]
    allocator_state["exp_avg_unc"] = [tensors[f"allocator.exp_avg_unc.{i}"] for i in range(count)]
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(meta["rng"]["python"]))
    numpy_meta = meta["rng"]["numpy"]
    np.random.set_state((numpy_meta[0], tensors["rng.numpy"].numpy().astype(np.uint32), *numpy_meta[1:]))
    return int(meta["step"]), optimizer, allocator_state, meta.get("extra", {})


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v) for v in value]}
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_tupled(v) for v in value["tuple"])
    return value
