"""Sampling parameters, checked where the user gives them.

The sampler itself (temperature, top-k, top-p, min-p, Gumbel-max with position-keyed noise) is the
accept kernel's, in kernels/accept.py: one definition for plain and speculative decoding.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import UsageError


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

    def kernel_args(self, seed) -> dict:
        """Arguments of the sample/accept kernels; `seed` is an int or a 0-d device tensor."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=seed)

    def resolve_seed(self) -> int:
        """The seed to use: the user's, or a fresh random one (32 bits, the noise hash's width)."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
