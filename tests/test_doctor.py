"""`dflash doctor`: the dependency floors it checks are the ones pyproject.toml states."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from dflash_cli import doctor
from dflash_cli.doctor import FLOORS, run_checks, version_tuple

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def test_floors_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    stated = {m[1]: version_tuple(m[2]) for d in deps if (m := re.match(r"(torch|triton)>=([\d.]+)", d))}
    assert stated == FLOORS


@pytest.mark.parametrize("version, parsed", [("2.13.0+cpu", (2, 13, 0)), ("3.4.0rc1", (3, 4, 0)),
                                             ("2.8.0a0+gitabc", (2, 8, 0)), ("3.10", (3, 10))])
def test_version_tuple(version, parsed):
    assert version_tuple(version) == parsed


def test_an_old_torch_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    check = next(c for c in run_checks() if c.name == "torch")
    assert check.status == "fail" and "2.5.1+cu121 is older than 2.8" in check.detail
    assert check.fix == "pip install -U 'torch>=2.8'"


def test_an_old_triton_fails_on_cuda_and_warns_on_cpu(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    for cuda, status in ((False, "warn"), (True, "fail")):
        check = doctor._floor_check("triton", triton.__version__, required=cuda)
        assert check.status == status and check.fix == "pip install -U 'triton>=3.4'"
    assert doctor._floor_check("triton", "3.4.0", required=True).status == "ok"
