"""Every public name imports (the import contracts themselves: tests/test_import_contracts.py)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import adalora_deploy


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


ROOT = Path(__file__).resolve().parents[1]
LAZY = "# lazy:"


def unlabelled_lazy_imports(source: str) -> list[int]:
    """Lines of function-local imports of our own modules with no ``# lazy: <reason>`` comment.

    A function-local import hides an edge of the import graph from a reader, so it is kept only where it
    keeps an optional or heavy dependency out of a light path, and says so: on the import's own line(s), or
    on the line just above a run of consecutive imports (one comment for the run).
    """
    lines = source.splitlines()

    def labelled(first: int, last: int) -> bool:
        return any(LAZY in lines[i - 1] and lines[i - 1].split(LAZY, 1)[1].strip()
                   for i in range(max(first, 1), last + 1))

    missing = []

    def visit(body: list[ast.stmt], in_function: bool) -> None:
        run_start = None  # first line of the run of consecutive imports the statement belongs to
        previous_end = None
        for statement in body:
            is_import = isinstance(statement, (ast.Import, ast.ImportFrom))
            if is_import:
                if previous_end is None or statement.lineno != previous_end + 1:
                    run_start = statement.lineno
                previous_end = statement.end_lineno
            else:
                run_start = previous_end = None
            if in_function and is_import and _imports_our_modules(statement):
                if not (labelled(statement.lineno, statement.end_lineno) or labelled(run_start - 1, run_start - 1)):
                    missing.append(statement.lineno)
            nested = in_function or isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(statement, field, None)
                if isinstance(inner, list):
                    visit(inner, nested)
            for block in [*getattr(statement, "handlers", []), *getattr(statement, "cases", [])]:
                visit(block.body, nested)

    visit(ast.parse(source).body, False)
    return missing


def _imports_our_modules(statement: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(statement, ast.ImportFrom):
        return statement.level > 0 or (statement.module or "").split(".")[0] == "adalora_deploy"
    return any(alias.name.split(".")[0] == "adalora_deploy" for alias in statement.names)


def test_every_function_local_import_of_our_modules_says_why_it_is_lazy():
    unlabelled = []
    for folder in ("adalora_deploy", "export"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line in unlabelled_lazy_imports(path.read_text(encoding="utf-8")):
                unlabelled.append(f"{path.relative_to(ROOT)}:{line}")
    assert not unlabelled, ("function-local imports of our modules without a `# lazy: <reason>` comment (move them "
                            f"to the top unless they keep a heavy or optional import off a light path): {unlabelled}")


def test_the_lazy_import_scan_finds_an_unlabelled_import():
    source = '''
from adalora_deploy.errors import UserError  # module level: not lazy


def f():
    from adalora_deploy.config import RunConfig
    # lazy: imports torch
    from adalora_deploy.training import train
    from adalora_deploy.models import load_base_model
    import json
    if True:
        from . import sibling
    from adalora_deploy.merge import merge_adapter  # lazy: imports torch
    from adalora_deploy.compaction import compact_adapter  # lazy:


class C:
    def method(self):
        try:
            pass
        except ImportError:
            import adalora_deploy.export.api
'''
    assert unlabelled_lazy_imports(source) == [6, 12, 14, 22]
