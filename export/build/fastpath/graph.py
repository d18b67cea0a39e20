"""Weights and graph bookkeeping of the fast path: the external data file written tensor by tensor, and the
node list with deterministic names (``/<scope>/<op>_<k>``) and shared constants."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from adalora_deploy.errors import ExportError

__all__ = ["FastPathUnsupported", "Graph", "WeightFile", "register_checker_schemas", "scope_of", "value_info"]

_ALIGN = 64
"""Byte alignment of each tensor in the external data file."""
_INLINE_MAX_BYTES = 1024
"""Tensors up to this size stay inside the protobuf (constants, norms of tiny models)."""


class FastPathUnsupported(ExportError):
    """The model is outside what the fast path builds; the caller should fall back to ``export_decoder``."""


def _np(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A contiguous numpy view (no copy for contiguous CPU tensors)."""
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor)
    return tensor.detach().cpu().contiguous().numpy()


class WeightFile:
    """Appends tensors to the external data file one by one; returns protos that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self._file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        if array.nbytes <= _INLINE_MAX_BYTES:
            proto.raw_data = array.tobytes()
            return proto
        pad = (-self.offset) % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self._file.close()


class Graph:
    """Nodes, initializers and constants of the graph under construction; node names ``/<scope>/<op>_<k>``."""

    def __init__(self, weights: WeightFile, float_type: np.dtype) -> None:
        self.weights = weights
        self.float_type = np.dtype(float_type)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._counters: collections.Counter[str] = collections.Counter()
        self._constants: dict[tuple, str] = {}

    def initializer(self, name: str, array: torch.Tensor | np.ndarray) -> str:
        if name in self._names:
            raise ExportError(f"fast path: initializer {name!r} emitted twice")
        self._names.add(name)
        self.initializers.append(self.weights.tensor(name, _np(array)))
        return name

    def floats(self, name: str, tensor: torch.Tensor) -> str:
        """A float initializer in the graph's float type."""
        return self.initializer(name, _np(tensor.detach().to(torch.float32)).astype(self.float_type, copy=False))

    def has(self, name: str) -> bool:
        return name in self._names

    def const(self, values, dtype=np.int64, shape: Sequence[int] | None = None) -> str:
        """A shared small constant initializer (``/model/constants/<dtype>/<values>``)."""
        array = np.asarray(values, dtype=dtype)
        if shape is not None:
            array = array.reshape(shape)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/model/constants/{array.dtype.name}/{array.tolist()}"
            self._constants[key] = self.initializer(name, array)
        return self._constants[key]

    def op(self, op_type: str, inputs: Sequence[str], scope: str, *, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs) -> list[str]:
        """Append one node; returns its output names (generated unless ``outputs`` names them)."""
        key = f"/{scope}/{op_type}" if scope else f"/{op_type}"
        name = f"{key}_{self._counters[key]}"
        self._counters[key] += 1
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))
        return list(outputs)

    def op1(self, op_type: str, inputs: Sequence[str], scope: str, **kwargs) -> str:
        return self.op(op_type, inputs, scope, **kwargs)[0]


def scope_of(path: str) -> str:
    """A module path as a node-name scope (``model.layers.0`` -> ``model/layers/0``)."""
    return path.replace(".", "/")


def value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def register_checker_schemas() -> None:
    """``SimplifiedLayerNormalization`` lives in onnxruntime's default-domain contrib set, unknown to onnx: give
    the checker a schema for it (idempotent). ``com.microsoft`` nodes are not validated by the checker."""
    if onnx.defs.has("SimplifiedLayerNormalization", ""):
        return
    F = onnx.defs.OpSchema.FormalParameter
    O = onnx.defs.OpSchema.FormalParameterOption
    A = onnx.defs.OpSchema.Attribute
    T = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[F("X", "T"), F("scale", "V")],
        outputs=[F("Y", "V"), F("inv_std_var", "U", param_option=O.Optional)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("U", ["tensor(float)", "tensor(float16)"], ""),
                          ("V", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[A("axis", helper.make_attribute("axis", -1)), A("epsilon", helper.make_attribute("epsilon", 1e-5)),
                    A("stash_type", helper.make_attribute("stash_type", 1))],
    )
    onnx.defs.register_schema(schema)
