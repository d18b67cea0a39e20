"""Writing artifacts so an interrupted run never leaves a half file, and reading tensors safely.

Everything we write goes to a temporary name in the destination folder and is renamed into place
(``os.replace`` is atomic on one filesystem). Folders are built under a temporary name and swapped in
whole. Tensors are read with safetensors only: a file a user hands us is never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adalora_deploy.errors import ArtifactError

if TYPE_CHECKING:  # tensors only in annotations: the onnxruntime-only serving side reads JSON through this module
    import torch

__all__ = ["ArtifactError", "atomic_dir", "TOKENIZER_FILES", "check_output_dir", "copy_tokenizer_files", "atomic_file", "load_tensors", "read_json", "read_json_object", "save_tensors", "write_json"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
"""Files of a Hugging Face model folder that describe the tokenizer and generation, copied verbatim."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse to replace a non-empty output folder unless ``overwrite`` (``--overwrite``) says so."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"--output {path} exists and is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ArtifactError(f"--output {path} exists and is not empty (pass --overwrite to replace it)")
    return path


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` that exist in ``source`` and not yet in ``target``; returns their names."""
    source, target = Path(source), Path(target)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file() and not (target / name).exists()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    return copied


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with one clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error})") from None


def read_json_object(folder: str | Path, name: str, what: str) -> dict[str, Any]:
    """Read ``folder/name`` as a JSON object; one clear error for a missing folder, file or wrong JSON type.

    Args:
        what: what the folder is, for the message (``"adapter"``, ``"export"``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{what} folder not found: {folder}")
    data = read_json(folder / name)
    if not isinstance(data, dict):
        raise ArtifactError(f"{folder / name} must hold a JSON object")
    return data


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous and detached)."""
    from safetensors.torch import save_file

    clean = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_file(path) as temp:
        save_file(clean, str(temp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle), with one clear error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path} is not a readable safetensors file ({error})") from None
