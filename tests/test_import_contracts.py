"""The layers of pyproject.toml's [tool.importlinter] hold, and a back-import breaks them.

import-linter reads the package from disk; in the repository export/ sits beside adalora_deploy/ and only
the install maps it to ``adalora_deploy.export``, so each check copies both into the installed layout (as
the wheel has it) and runs ``lint-imports`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def _layout(tmp_path: Path) -> Path:
    """adalora_deploy/ with export/ inside it, and the contracts, under ``tmp_path``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "adalora_deploy", tmp_path / "adalora_deploy", ignore=ignore)
    shutil.copytree(ROOT / "export", tmp_path / "adalora_deploy" / "export", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run([LINT, "--no-cache"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contracts_hold(tmp_path):
    result = _lint(_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and " kept" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the serving engine reaching into the build side for a constant (what it did before contract.py)
        ("export/runtime/engine.py", "from adalora_deploy.export.build.adapter_file import write_onnx_adapter",
         "runtime serves with onnxruntime alone"),
        ("export/runtime/session.py", "import torch", "runtime serves with onnxruntime alone"),
        # a core module reaching up into export
        ("compaction.py", "import adalora_deploy.export.api", "core below export"),
        ("export/build/graph.py", "from adalora_deploy.export.judge import parity", "export by job"),
        ("export/contract.py", "import numpy", "the graph contract imports nothing heavy"),
        # gptq/ reading backends/ (as before QuantLinear moved into gptq/): a cycle between siblings
        ("gptq/packing.py", "from adalora_deploy.backends import gptq", "no cycles between our modules"),
    ],
)
def test_a_back_import_breaks_a_contract(tmp_path, module, line, broken):
    folder = _layout(tmp_path)
    _append(folder / "adalora_deploy" / module, line)
    result = _lint(folder)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
