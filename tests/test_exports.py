"""The public API: every name in ``meshfed.__all__`` exists and is exported once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import meshfed


def test_top_level_names_exist() -> None:
    for name in meshfed.__all__:
        assert hasattr(meshfed, name), name
    assert len(set(meshfed.__all__)) == len(meshfed.__all__)


def test_every_module_declares_all_and_each_name_lives_in_one_module() -> None:
    owners: dict[str, str] = {}
    for info in pkgutil.walk_packages(meshfed.__path__, "meshfed."):
        if info.name.endswith(("libp2p", "_sealed")):
            continue  # imported lazily; covered by tests/transports/test_libp2p.py
        module = importlib.import_module(info.name)
        if info.ispkg:
            continue
        assert hasattr(module, "__all__"), f"{info.name} has no __all__"
        for name in module.__all__:
            value = getattr(module, name)
            is_definition = inspect.isclass(value) or inspect.isfunction(value)
            defined_in = value.__module__ if is_definition else info.name
            assert defined_in == info.name, f"{info.name} re-exports {name} from {defined_in}"
            assert name not in owners, f"{name} is public in {owners.get(name)} and {info.name}"
            owners[name] = info.name


def test_importing_meshfed_does_not_import_libp2p() -> None:
    import subprocess
    import sys

    code = "import sys, meshfed, meshfed.cli; print('libp2p' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
