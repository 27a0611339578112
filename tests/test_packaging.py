"""What `pip install .` ships, and what a clone's root puts on sys.path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_lists_every_package_under_dflash_cli():
    """setuptools ships only the packages pyproject names: a package left out imports in an editable
    install and is missing from a wheel (dflash_cli.models and dflash_cli.train once were)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(Path(folder).relative_to(ROOT).parts)
               for folder, _, files in os.walk(ROOT / "dflash_cli", followlinks=True)  # kernels is a link
               if any(f.endswith(".py") for f in files)}
    assert on_disk == listed


def test_the_kernels_install_as_dflash_cli_kernels_and_shadow_nothing():
    """From the repo root (on sys.path under `python -m pytest` and in the benchmarks), `kernels` must
    not be this folder: transformers imports Hugging Face's `kernels` package by that name."""
    assert (ROOT / "dflash_cli" / "kernels").resolve() == ROOT / "kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists()
    probe = ("import importlib.util as u, dflash_cli.kernels.accept as a; s = u.find_spec('kernels'); "
             "print(a.__name__); print(s is not None and s.origin is not None and s.origin)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    name, origin = out.stdout.split()
    assert name == "dflash_cli.kernels.accept"
    assert origin == "False" or not Path(origin).resolve().is_relative_to(ROOT), origin


def test_no_folder_a_script_runs_from_holds_a_kernels_module():
    """A script's own folder is sys.path[0]: a kernels.py beside it (benchmarks/kernels.py once was) hides
    Hugging Face's package from transformers, and loading any tokenizer fails."""
    for folder in (ROOT, ROOT / "benchmarks", ROOT / "scripts"):
        assert not (folder / "kernels.py").exists() and not (folder / "kernels" / "__init__.py").exists(), folder
