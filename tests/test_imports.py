"""The import rules: every public name imports, and the contracts in pyproject.toml hold.

The contracts (``[tool.importlinter]``) are checked with import-linter on a copy of the package laid out as it
is installed: ``export/`` lives at the repository root but installs as ``adalora_deploy.export``
(pyproject's package-dir), and an import graph of the source tree would not see it at all.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adalora_deploy

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> list[str]:
    """adalora_deploy and every package below it (export's included, however it is split)."""
    import adalora_deploy.export  # installed from another folder (package-dir): not on adalora_deploy.__path__

    found = ["adalora_deploy", "adalora_deploy.export"]
    for package in (adalora_deploy, adalora_deploy.export):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.ispkg:
                found.append(info.name)
    return sorted(set(found))


@pytest.mark.parametrize("package", _packages())
def test_every_public_name_imports(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if names is None:
        pytest.skip(f"{package} declares no __all__")
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names that do not import: {missing}"
    namespace: dict = {}
    exec(f"from {package} import {', '.join(names)}", namespace)  # the way a user writes it
    assert set(names) <= set(namespace)


def test_read_compact_adapter_is_importable_from_the_top():
    from adalora_deploy import read_compact_adapter
    from adalora_deploy.peft_format import read_compact_adapter as defined

    assert read_compact_adapter is defined


def _installed_tree(tmp_path: Path) -> Path:
    """The package as pip installs it (export/ inside adalora_deploy/), with pyproject.toml beside it."""
    tree = tmp_path / "installed"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "adalora_deploy", tree / "adalora_deploy", ignore=ignore)
    shutil.copytree(ROOT / "export", tree / "adalora_deploy" / "export", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    # PYTHONPATH comes before the editable install's finder, so the copy is the package that gets analysed.
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tree)})


def test_import_contracts_hold(tmp_path):
    pytest.importorskip("importlinter", reason="import-linter is in the [test] extra")
    result = _lint_imports(_installed_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_import_contracts_catch_a_cycle(tmp_path):
    """The contracts bite: one back-import (gptq/ reading backends/, as before QuantLinear moved) fails them."""
    pytest.importorskip("importlinter", reason="import-linter is in the [test] extra")
    tree = _installed_tree(tmp_path)
    packing = tree / "adalora_deploy" / "gptq" / "packing.py"
    packing.write_text(packing.read_text(encoding="utf-8") + "\nfrom adalora_deploy.backends import gptq\n",
                       encoding="utf-8")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "no cycles between our modules BROKEN" in result.stdout
    assert ".gptq -> .backends" in result.stdout or ".backends -> .gptq" in result.stdout
