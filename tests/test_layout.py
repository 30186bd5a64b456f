"""The repository's layout: no folder or file at its root may shadow an installed distribution.

``python``, ``python -m pytest`` and every script run from the root put the root first on ``sys.path``, so a
root ``kernels/__init__.py`` once hid the PyPI package ``kernels`` that transformers imports. The engine's
folders beside ``inferix/`` are namespace folders (no ``__init__.py``) that ``inferix`` maps to its subpackages.
"""
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN = "inferix"


def root_python(code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` with the repository root as the working directory (so '' is first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def regular_root_modules() -> dict[str, Path]:
    """Names Python imports from the root ahead of any installed package: modules and regular packages."""
    found = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            found[entry.stem] = entry
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            found[entry.name] = entry
    return found


def test_no_root_module_or_package_is_a_top_level_name_of_an_installed_distribution():
    installed = md.packages_distributions()
    shadowing = {name: installed[name] for name in regular_root_modules()
                 if name in installed and OWN not in installed[name]}
    assert not shadowing, f"root entries shadow installed distributions: {shadowing}"
    assert set(regular_root_modules()) == {OWN}, "only inferix/ may be a regular package at the root"


def test_root_folders_named_like_installed_packages_lose_to_the_installed_ones():
    """Behaviour, not only the file listing: every root folder whose name an installed distribution also uses
    (today `kernels`) imports the installed package when Python runs from the root."""
    installed = md.packages_distributions()
    clashes = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name in installed and p.name != OWN)
    code = ("import importlib, json, sys; "
            f"print(json.dumps({{n: list(getattr(importlib.import_module(n), '__path__', [])) "
            f"or [importlib.import_module(n).__file__] for n in {clashes!r}}}))")
    out = root_python(code)
    assert out.returncode == 0, out.stderr
    for name, paths in json.loads(out.stdout).items():
        assert all(not Path(p).resolve().is_relative_to(ROOT / name) for p in paths), f"{name} resolved to {paths}"


@pytest.mark.slow
def test_transformers_and_diffusers_import_their_hub_kernels_from_the_root():
    out = root_python("import transformers, diffusers; from transformers.integrations import hub_kernels; "
                      "import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "kernels")


def test_the_engine_folders_are_inferix_subpackages():
    out = root_python("import inferix.kernels.attention as k, inferix.models.bundle as m, inferix.lvbench.vde as l, "
                      "inferix.app.hub as a; print(k.__file__); print(m.__file__); print(l.__file__); "
                      "print(a.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    folders = [Path(line).resolve().parent.name for line in out.stdout.split()]
    assert folders == ["kernels", "models", "lvbench", "app"]
