"""Writing artifacts so an interrupted run never leaves a half file, and reading tensors safely.

Everything we write goes to a temporary name in the destination folder and is renamed into place
(``os.replace`` is atomic on one filesystem). Folders are built under a temporary name and swapped in
whole. Tensors are read with safetensors only: a file a user hands us is never unpickled.
"""

from __future__ import annotations

import contextlib
import errno
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

__all__ = [
    "TOKENIZER_FILES",
    "ArtifactError",
    "atomic_dir",
    "atomic_file",
    "check_output_dir",
    "copy_tokenizer_files",
    "load_tensors",
    "read_json",
    "read_json_object",
    "recover",
    "save_tensors",
    "write_error",
    "write_json",
]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Files that torch.load would unpickle; never opened, only named in the error that refuses them."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
"""Files of a Hugging Face model folder that describe the tokenizer and generation, copied verbatim."""


def write_error(path: str | Path, error: OSError) -> ArtifactError:
    """One clear error for a failed write: what could not be written, why, and what to do."""
    hints = {errno.EACCES: "the folder is not writable: fix its permissions or choose another --output",
             errno.EPERM: "the folder is not writable: fix its permissions or choose another --output",
             errno.EROFS: "the file system is read-only: choose another --output",
             errno.ENOSPC: "the disk is full: free some space or choose another --output",
             errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output"}
    reason = error.strerror or str(error)
    hint = hints.get(error.errno, "nothing partial was left behind")
    return ArtifactError(f"cannot write {path}: {reason}; {hint}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    Raises:
        ArtifactError: the file cannot be written (read-only folder, full disk...); ``path`` is untouched.
    """
    path = Path(path)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        yield Path(temp)
        os.replace(temp, path)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> Path:
    """Undo a folder swap that was killed between its two renames (``path`` missing, its ``.old`` present)."""
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        os.replace(_old(path), path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    Replacing an existing folder takes two renames (old aside, new in); a process killed between them
    leaves ``.<name>.old``, which :func:`recover` (called here first) puts back.

    Raises:
        ArtifactError: the folder cannot be written (read-only folder, full disk...); ``path`` is untouched.
    """
    path = Path(path)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        yield temp
        if path.exists():
            old = _old(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        if temp is not None:
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
        pickles = sorted(p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES) if path.parent.is_dir() else []
        if pickles:
            raise ArtifactError(f"{path.parent} holds {pickles[0]}, a pickle file, and no {path.name}: adalora-deploy "
                                "reads tensors from safetensors only, because unpickling a file can run code; re-save "
                                "it as safetensors (e.g. save_pretrained(..., safe_serialization=True))")
        raise ArtifactError(f"missing file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path} is not a readable safetensors file ({error})") from None
