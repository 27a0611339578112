"""Sampling parameters, checked where the user gives them.

The sampler itself (temperature, top-k, top-p, min-p, Gumbel-max with position-keyed noise) is the
accept kernel's, in kernels/accept.py: one definition for plain and speculative decoding.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import UsageError


class Mode(NamedTuple):
    """Which sampling code runs: greedy, or sampling with each filter on or off. A captured graph is
    specialised on it; the filters' values are data (`DeviceSampling`)."""

    greedy: bool
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False

    @classmethod
    def of(cls, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> "Mode":
        """The mode of plain-number parameters (tensors need their mode given)."""
        if temperature == 0.0:
            return cls(True)
        return cls(False, top_k > 0, top_p < 1.0, min_p > 0.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan passes `< 0`
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UsageError(f"--min-p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def mode(self) -> Mode:
        """Which sampling code runs (greedy, or which filters): what a captured graph is specialised on."""
        return Mode.of(self.temperature, self.top_k, self.top_p, self.min_p)

    def resolve_seed(self) -> int:
        """The seed to use: the user's, or a fresh random one (32 bits, the noise hash's width)."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")


class DeviceSampling:
    """The current generation's sampling values as 0-d device tensors, refilled per generation.

    The sampler kernels read them on the device, so one captured CUDA graph per `Mode` serves every
    temperature, top-k, top-p, min-p and seed: changing `/set temperature` in a chat costs no capture
    and no graph memory."""

    def __init__(self, device: torch.device):
        def scalar(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.temperature, self.top_p, self.min_p = (scalar(torch.float32) for _ in range(3))
        self.top_k, self.seed = scalar(torch.int64), scalar(torch.int64)

    def load(self, params: SamplingParams) -> Mode:
        """Fill in `params` (a fresh random seed when none is given); returns its mode."""
        for name in ("temperature", "top_p", "min_p", "top_k"):
            getattr(self, name).fill_(getattr(params, name))
        self.seed.fill_(params.resolve_seed() & 0xFFFFFFFF)
        return params.mode

    def kernel_args(self, mode: Mode) -> dict:
        """Keyword arguments of `ops.sample` / `ops.accept`."""
        return dict(mode=mode, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    seed=self.seed)
