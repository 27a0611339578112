"""Kernel tests: Triton kernels against their torch references.

Without a GPU they run under Triton's CPU interpreter: TRITON_INTERPRET=1 is set here, before any
kernel module is imported (triton.jit picks the interpreter when a kernel is defined). Inputs are
random values from a fixed seed (DFLASH_TEST_SEED overrides it; `random` draws a fresh one per
test); the seed is in every failure message. Outputs the launchers allocate
are poisoned (NaN, or -1 for integers), so an element a kernel forgets to write fails the
comparison. DFLASH_KERNELS is cleared for every test here (a test that wants it sets it with
monkeypatch), so neither the caller's environment nor these tests change which path others take.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    early = sorted(m for m in sys.modules if m.startswith("dflash_cli.kernels."))
    assert not early, f"{early} were imported before TRITON_INTERPRET was set: their kernels cannot run on the CPU"
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=8e-2)}


DEFAULT_SEED = 20250601


def chosen_seed() -> int:
    """DFLASH_TEST_SEED: an integer to replay a failure (the seed is in every failure message), or
    `random` for fresh inputs each test; unset, every run draws the same inputs."""
    value = os.environ.get("DFLASH_TEST_SEED", "").strip()
    if value.lower() == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(value) if value else DEFAULT_SEED
    except ValueError:
        raise pytest.UsageError(f"DFLASH_TEST_SEED must be an integer or 'random', got {value!r}") from None


@pytest.fixture
def seed() -> int:
    s = chosen_seed()
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def kernel_mode_is_local(monkeypatch):
    monkeypatch.delenv("DFLASH_KERNELS", raising=False)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """torch.empty / empty_like return poisoned memory while a kernel test runs."""
    poison_empty(monkeypatch)


def poison_empty(monkeypatch) -> None:
    """torch.empty / empty_like return poisoned memory until `monkeypatch` undoes it."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
