"""Adapters as onnxruntime ``.onnx_adapter`` files, for graphs exported with ``--adapter-inputs``.

Such a graph takes every adapted module's factors as inputs ``<module>.lora_A`` [in, rank] and
``<module>.lora_B`` [rank, out] with rank-0 defaults (the base model); an adapter file overrides them per run
(``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``, or onnxruntime-genai's ``og.Adapters``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from adalora_deploy.artifacts import atomic_file
from adalora_deploy.errors import ExportError
from adalora_deploy.peft_format import read_compact_adapter

from ..contract import MODEL_FILE, is_lora_A
from ..runtime.session import adapter_feeds
from .manifest import read_manifest

__all__ = ["add_default_adapter_inputs", "write_adapter_file", "write_onnx_adapter"]


def write_onnx_adapter(path: str | os.PathLike, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       *, adapter_version: int = 1, model_version: int = 1) -> Path:
    """Write factors (module -> ``(A [r, in], B [out, r])``) as an onnxruntime ``.onnx_adapter`` file.

    Parameters are named like the graph inputs (``<module>.lora_A`` [in, r], ``<module>.lora_B`` [r, out]);
    load with ``onnxruntime.LoraAdapter().Load(path)`` and activate with ``RunOptions.add_active_adapter``.
    """
    arrays = adapter_feeds(factors)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    path = Path(path)
    with atomic_file(path) as temp:
        adapter.export_adapter(str(temp))
    return path


def write_adapter_file(adapter: str | os.PathLike, export_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Turn any AdaLoRA adapter for the same base into an ``.onnx_adapter`` for an adapter-inputs graph.

    Only the adapter folder is read (no base model): each module's surviving factors become
    ``<module>.lora_A`` / ``.lora_B``; graph modules the adapter does not adapt (or prunes to rank 0) get
    rank-0 factors, so their branch adds nothing.

    Raises:
        ExportError: the export has no adapter inputs, or the adapter adapts a module the graph has no
            branch for, or a factor's width differs from the graph input's.
    """
    manifest = read_manifest(export_dir)
    if not manifest.adapter_inputs:
        raise ExportError(f"{export_dir} was exported without --adapter-inputs; its adapter is baked into the graph")
    proto = onnx.load(str(Path(export_dir) / MODEL_FILE), load_external_data=False)
    widths = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
              if i.name in manifest.adapter_input_names}
    modules = sorted({name.rsplit(".", 1)[0] for name in manifest.adapter_input_names})
    compact = read_compact_adapter(adapter)
    extra = [layer.name for layer in compact.layers if layer.name not in modules and layer.rank > 0]
    if extra:
        raise ExportError(f"adapter {adapter} adapts {extra[0]}, which has no branch in {export_dir} "
                          f"({len(extra)} such modules); export a graph whose adapter covers them")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_name = {layer.name: layer for layer in compact.layers}
    for name in modules:
        in_features, _ = widths[f"{name}.lora_A"]
        _, out_features = widths[f"{name}.lora_B"]
        layer = by_name.get(name)
        if layer is None or layer.rank == 0:
            factors[name] = (torch.zeros(0, in_features), torch.zeros(out_features, 0))
            continue
        A, B = layer.lora_factors()
        if (A.shape[1], B.shape[0]) != (in_features, out_features):
            raise ExportError(f"adapter {adapter}: {name} is {B.shape[0]}x{A.shape[1]}, the graph's branch is "
                              f"{out_features}x{in_features}: this adapter was trained for another base")
        factors[name] = (A, B)
    return write_onnx_adapter(output, factors)


def add_default_adapter_inputs(model_path: Path, names: tuple[str, ...]) -> None:
    """Give every adapter input a rank-0 default initializer (``[in, 0]`` / ``[0, out]``).

    onnxruntime then treats them as overridable initializers: a run without adapter feeds computes the
    base model, and an ``.onnx_adapter`` activated with ``RunOptions.add_active_adapter`` overrides them
    (onnxruntime only lets adapters replace inputs that have such defaults).
    """
    proto = onnx.load(str(model_path), load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    for name in names:
        size = shapes[name][0] if is_lora_A(name) else shapes[name][1]
        shape = (size, 0) if is_lora_A(name) else (0, size)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
    onnx.save(proto, str(model_path))
    onnx.checker.check_model(str(model_path))
