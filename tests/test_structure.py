"""The package's shape as users meet it: one installed package, one CLI, one error type, torch-free serving."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adalora_deploy import errors
from adalora_deploy.cli import COMMAND_GROUPS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "run", "quantize", "compact", "merge", "export", "check", "adapter-file", "generate", "serve",
            "lm-eval")

BLOCK_HEAVY_IMPORTS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def _python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_every_user_error_derives_from_one_base():
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, Exception)]
    assert len(classes) >= 14
    assert all(issubclass(cls, errors.UserError) for cls in classes)
    # and still from the builtin type callers caught before
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.UnsupportedLayerError, TypeError)
    assert issubclass(errors.ParityError, AssertionError) and issubclass(errors.ProviderError, RuntimeError)


def test_every_command_has_one_registered_handler_named_run_command():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert tuple(subparsers.choices) == COMMANDS
    for name, sub in subparsers.choices.items():
        handler = sub.get_default("run")
        assert handler.__name__ == f"run_{name.replace('-', '_')}"
        assert handler.__module__ in {group.__name__ for group in COMMAND_GROUPS}


def test_check_cuda_on_a_cpu_onnxruntime_is_one_line_and_exit_2(tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert main(["check", str(tmp_path), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime-gpu" in err and "--provider cpu" in err


def test_runtime_does_not_import_torch(tmp_path):
    code = ("import sys; import adalora_deploy.export.runtime.session, adalora_deploy.errors, adalora_deploy.cli; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'onnxscript') if m in sys.modules); "
            "print(heavy)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_help_works_where_torch_cannot_be_imported(tmp_path):
    code = BLOCK_HEAVY_IMPORTS.format(blocked={"torch", "transformers", "bitsandbytes"}) + (
        "from adalora_deploy.cli import main\nraise SystemExit(main(['--help']))")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in COMMANDS)


def test_a_users_export_folder_shadows_nothing(tmp_path):
    shadow = tmp_path / "export"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise RuntimeError('the user export package was imported')\n")
    (tmp_path / "export.py").write_text("raise RuntimeError('the user export module was imported')\n")
    code = ("import adalora_deploy.export.api, adalora_deploy.export.judge.check; "
            "from adalora_deploy.cli import main; raise SystemExit(main(['--help']))")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in COMMANDS)


def test_a_failing_command_module_is_an_error_not_a_silence(tmp_path):
    code = BLOCK_HEAVY_IMPORTS.format(blocked={"adalora_deploy.cli.export"}).replace(
        'name.split(".")[0] in', "name in") + "from adalora_deploy.cli import main\nmain(['--help'])"
    result = _python(code, tmp_path)
    assert result.returncode != 0 and "adalora_deploy.cli.export" in result.stderr


def test_readme_export_table_is_the_registry(tmp_path):
    from adalora_deploy.export.build.kinds import arithmetic_table

    assert arithmetic_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_wheel_installs_export_inside_the_package(tmp_path):
    """A built wheel holds adalora_deploy/export/ and no top-level export package, and it imports."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("adalora_deploy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "adalora_deploy/export/api.py" in names and "adalora_deploy/export/build/kinds/gptq.py" in names
    assert not any(name.startswith("export/") for name in names)
    packages = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    sources = {str(p.parent.relative_to(ROOT)).replace("export", "adalora_deploy/export", 1)
               if p.parts[len(ROOT.parts)] == "export" else str(p.parent.relative_to(ROOT))
               for p in list((ROOT / "adalora_deploy").rglob("__init__.py")) + list((ROOT / "export").rglob("__init__.py"))}
    assert packages == sources, "pyproject.toml's package list misses a package"
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    code = ("import adalora_deploy.export.api as api, adalora_deploy.cli as cli; "
            "print(api.__file__); cli.build_parser()")
    result = _python(code, tmp_path, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target / "adalora_deploy" / "export"))


HEAVY = {"torch", "transformers", "bitsandbytes", "onnx", "onnxscript", "peft"}


def _requirement_closure(requirements: list[str], extras: set[str]) -> set[str]:
    """Names of the installed distributions that ``requirements`` (with ``extras`` active) pull in, transitively."""
    import importlib.metadata

    from packaging.requirements import Requirement

    names: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, frozenset(extras)) for r in requirements]
    while todo:
        text, active = todo.pop()
        requirement = Requirement(text)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in active | {""}):
            continue
        name, wanted = requirement.name.lower().replace("_", "-"), frozenset(requirement.extras)
        names.add(name)
        if (name, wanted) in visited:
            continue
        visited.add((name, wanted))
        try:
            todo += [(r, wanted) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass
    return names


def test_base_and_serve_installs_pull_no_torch():
    import importlib.metadata

    requires = importlib.metadata.requires("adalora-deploy")
    base = _requirement_closure(requires, set())
    serve = _requirement_closure(requires, {"serve"})
    assert not base & HEAVY and not serve & HEAVY, (base & HEAVY, serve & HEAVY)
    assert {"onnxruntime", "tokenizers", "fastapi", "uvicorn", "jinja2"} <= serve
    everything = _requirement_closure(requires, {"test"})  # the README's install line: training users get it all
    assert {"torch", "transformers", "bitsandbytes", "onnx", "onnxruntime", "peft", "onnxruntime-genai", "fastapi",
            "openai", "pytest"} <= everything


def test_a_training_command_on_a_serving_install_names_the_extra(tmp_path):
    blocker = """
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Missing())
"""
    code = blocker + "from adalora_deploy.cli import main\nraise SystemExit(main(['train', 'builtin:none.yaml']))"
    result = _python(code, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "pip install 'adalora-deploy[train]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
