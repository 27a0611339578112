"""tests/fit_cache.py: a fitted drafter is the same whichever test first asks for it."""
from __future__ import annotations

import os

import pytest

from tests import fit_cache


@pytest.mark.parametrize("use_cache", ["1", "0"])
def test_a_fit_runs_on_the_default_kernel_path_and_the_switches_come_back(tmp_path, monkeypatch, use_cache):
    monkeypatch.setattr(fit_cache, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("DFLASH_TEST_CACHE", use_cache)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")  # as test_bf16_exact's exact_path sets them
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    seen = {}

    def fit(directory):
        seen.update({k: os.environ.get(k) for k in fit_cache.KERNEL_SWITCHES})
        directory.mkdir(parents=True)
        (directory / "w").write_text("fitted")
        return directory

    out = fit_cache.cached("probe", tmp_path / "out", "digest", fit)
    assert (out / "w").read_text() == "fitted"
    assert seen == {"DFLASH_KERNELS": None, "DFLASH_LINEAR": None}
    assert os.environ["DFLASH_KERNELS"] == "triton" and os.environ["DFLASH_LINEAR"] == "invariant"
