"""``export.json``: what an export folder holds, which arithmetic its graph reproduces, and file hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import adalora_deploy
from adalora_deploy.artifacts import read_json_object
from adalora_deploy.errors import ArtifactError

from ..contract import MANIFEST_FILE, MODEL_FILE

__all__ = [
    "MANIFEST_VERSION",
    "ExportManifest",
    "package_versions",
    "read_manifest",
    "sha256_file",
    "verify_files",
]

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ExportManifest:
    """``export.json``: what an export folder holds and which arithmetic its graph reproduces."""

    mode: str
    """``merged`` or ``separate``."""
    weights: str
    """Merged: ``fp32``/``fp16``/``int4``/``int8``; separate: ``fp32`` (the base keeps its own quantization)."""
    serving: bool
    """Separate mode: fast lossy kernels (accuracy_level 4) instead of the exact arithmetic."""
    adapter_inputs: bool
    """Adapter factors are graph inputs (symbolic rank) and ``adapter.onnx_adapter`` holds this adapter's."""
    quantization: str
    """How the base was loaded: ``none``, ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``, ``gptq``."""
    double_quant: bool
    """bnb 4-bit double quantization of the statistics."""
    base_kind: str
    """The base layers' kind as the backends describe them (e.g. ``gptq-4bit-g32-act``, ``bnb-nf4-dq``)."""
    base_path: str
    adapter_path: str
    arithmetic: str
    """What the graph computes, in words (which torch arithmetic it reproduces)."""
    tier: str
    """Parity tier of the graph against the torch model rebuilt with the same conversion."""
    source_tier: str
    """Parity tier of the graph against the source model (adapter on the base with its own torch kernel):
    the tier ``check`` judges the export by, since the source is what was trained."""
    ranks: dict[str, int]
    """Surviving rank of every adapted module (0: no branch in separate mode)."""
    adapter_matmuls: int
    """MatMul nodes of adapter branches: in separate mode 2 per module with rank > 0 (any rank with adapter
    inputs), except that siblings the fast path fuses (q/k/v, gate/up) share 2 when two or more of them hold
    factors of rank > 0 as initializers; 0 when merged."""
    quantized_ops: dict[str, int]
    """Quantized-arithmetic node counts (``com.microsoft::*``, ``MatMulInteger``)."""
    op_counts: dict[str, int]
    """Every node count by op."""
    adapter_input_names: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    files: dict[str, str]
    """File name -> sha256 of every file in the folder but ``export.json`` (and ``parity.json``)."""
    sizes: dict[str, int]
    """File name -> bytes."""
    versions: dict[str, str]
    """torch, transformers, onnx, onnxruntime, adalora_deploy (and bitsandbytes when installed)."""
    builder: str = "dynamo"
    """What built the graph: ``fast`` (the direct builder, fused contrib ops) or ``dynamo`` (torch.onnx.export)."""
    requantization: dict[str, Any] | None = None
    """Merged int4/int8: how the merged weights were re-quantized (method, bits, block, calibration)."""
    agreement: dict[str, Any] | None = None
    """Measured at export time, graph vs source on held-out text: positions, top-1 agreement, mean KL,
    max abs, and the tier's verdict on them (``passed``), so no graph ships without its numbers."""
    task: str = "causal-lm"
    """``causal-lm`` (a KV-cache decoding graph) or ``classification`` (``input_ids``, ``attention_mask`` ->
    ``logits`` [batch, num_labels])."""
    labels: tuple[str, ...] | None = None
    """classification: the label names in logit order (the server names its answers with them)."""
    format_version: int = MANIFEST_VERSION
    output_dir: str = field(default="", compare=False)
    """Where the folder was read from or written to (not stored)."""

    @property
    def graph_bytes(self) -> int:
        """Bytes of ``model.onnx`` plus its external data."""
        return sum(size for name, size in self.sizes.items() if name.startswith(MODEL_FILE))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("output_dir")
        for key in ("adapter_input_names", "input_names", "output_names"):
            data[key] = list(data[key])
        if data["labels"] is not None:
            data["labels"] = list(data["labels"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], output_dir: str | os.PathLike = "") -> ExportManifest:
        fields = [f for f in dataclasses.fields(cls) if f.name != "output_dir"]
        names = {f.name for f in fields}
        optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
        missing = sorted(names - set(data) - optional)
        if missing:
            raise ArtifactError(f"{Path(output_dir) / MANIFEST_FILE}: missing keys {missing}; re-export the folder")
        values = {k: data[k] for k in names if k in data}
        for key in ("adapter_input_names", "input_names", "output_names"):
            values[key] = tuple(values[key])
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"])
        return cls(**values, output_dir=str(output_dir))


def read_manifest(export_dir: str | os.PathLike) -> ExportManifest:
    """Read ``export.json`` of an export folder.

    Raises:
        ArtifactError: the folder or its manifest is missing or malformed.
    """
    folder = Path(export_dir)
    return ExportManifest.from_dict(read_json_object(folder, MANIFEST_FILE, "export"), folder)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages an export depends on (recorded in the manifest)."""
    versions = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "bitsandbytes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["adalora_deploy"] = adalora_deploy.__version__
    return versions


def verify_files(manifest: ExportManifest, names: tuple[str, ...] | None = None) -> None:
    """Check that the export folder's files are the ones ``export.json`` lists (present, same sha256).

    A graph edited by hand, a missing ``model.onnx.data`` or a half-copied folder is caught here, before
    onnxruntime loads something the manifest does not describe.

    Args:
        manifest: as read by :func:`read_manifest` (its ``output_dir`` is the folder).
        names: only these files (default: every listed file).

    Raises:
        ArtifactError: a listed file is missing or its content differs.
    """
    folder = Path(manifest.output_dir)
    for name in names or tuple(manifest.files):
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (export.json lists it); copy the whole export folder or "
                                "export again")
        if path.stat().st_size != manifest.sizes.get(name, path.stat().st_size) or sha256_file(path) != manifest.files[name]:
            raise ArtifactError(f"{path} differs from the file export.json describes (sha256 mismatch): it was "
                                "modified or corrupted after export; export again")
