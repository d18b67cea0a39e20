"""Every public name imports (the import contracts themselves: tests/test_import_contracts.py)."""

from __future__ import annotations

import importlib
import pkgutil

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
