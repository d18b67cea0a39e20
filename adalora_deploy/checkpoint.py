"""Our resumable training checkpoint (the PEFT adapter format is :mod:`adalora_deploy.peft_format`).

Training checkpoint folder (safetensors and JSON only; nothing is ever unpickled)::

    state.json                   step, config, optimizer hyper-parameters, allocator flags, RNG bookkeeping
    tensors.safetensors          adapter state (incl. masks), allocator EMAs, optimizer moments, RNG states

It is written to a temporary folder and swapped into place whole.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adalora_deploy.adapters import AdapterSet
from adalora_deploy.artifacts import (
    atomic_dir,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from adalora_deploy.errors import AdapterMismatchError

__all__ = ["load_training_checkpoint", "save_training_checkpoint"]


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
