"""Sampling parameters, checked where the user gives them.

The sampler itself (temperature, top-k, top-p, min-p, Gumbel-max with position-keyed noise) is the
accept kernel's, in kernels/accept.py: one definition for plain and speculative decoding.

The limits of every setting a user gives (`run`'s flags, `chat`'s /set) are `setting_problem`'s:
one definition, so that a value one command refuses in one line the other does not crash on.

A temperature below `GREEDY_BELOW` is greedy decoding. The sampler divides the logits by T in
float32: below about 1e-37 the quotient overflows to inf (or T itself rounds to 0), and the
"sample" is garbage. Long before that, under 1e-20, sampling is greedy in all but name: the Gumbel
noise spans less than 21 (its uniforms are 24-bit), so for it to put another token above the largest
logit the two logits would have to agree within 21·T < 3e-19.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import UsageError

GREEDY_BELOW = 1e-20  # a temperature under this is greedy (see above)
TEMPERATURE_MAX = 3.4028234663852886e38  # float32's largest: the sampler's temperature is a float32
TOP_K_MAX = 2**31 - 1  # any k from the vocabulary's size up keeps every token
# Any smaller top_p keeps the most likely token alone, as this one does (its probability is at least
# 1/vocabulary > 1e-6); far smaller ones round to 0 in float32, and top-p would then keep no token.
TOP_P_MIN = 1e-6

# What each setting is: chat's /set parses its text as this type.
KINDS: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int,
                          "seed": int}


def setting_problem(name: str, value) -> str | None:
    """What is wrong with `value` for the setting `name` ("must be …, got …"), or None if it is fine.
    A caller puts the flag or command in front: "--top-k must be…", "/set top_k: must be…"."""
    if name == "temperature":
        if not math.isfinite(value) or value < 0:  # nan passes `< 0`
            return f"must be a finite number >= 0, got {value}"
        if value > TEMPERATURE_MAX:
            return f"must be at most {TEMPERATURE_MAX:.4g} (float32's largest number), got {value:g}"
    elif name == "top_k":
        if not 0 <= value <= TOP_K_MAX:
            return f"must be a whole number from 0 (off) to {TOP_K_MAX}, got {value}"
    elif name == "top_p":
        if not TOP_P_MIN <= value <= 1:
            return f"must be in [{TOP_P_MIN:g}, 1], got {value}"
    elif name == "min_p":
        if not 0 <= value < 1:
            return f"must be in [0, 1), got {value}"
    elif name == "max_tokens":
        if value < 1:
            return f"must be at least 1, got {value}"
    elif name != "seed":  # any whole number is a seed: its low 32 bits key the noise
        raise KeyError(name)
    return None


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
        if temperature < GREEDY_BELOW:
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
        for name in ("temperature", "top_k", "top_p", "min_p"):
            problem = setting_problem(name, getattr(self, name))
            if problem is not None:
                raise UsageError(f"--{name.replace('_', '-')} {problem}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that it is the same (`GREEDY_BELOW`)."""
        return self.mode.greedy

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

        # One float32 buffer, [temperature, top_p, min_p]: the sampler reads it as it is (no launch to stack them).
        self.values = torch.zeros(3, dtype=torch.float32, device=device)
        self.temperature, self.top_p, self.min_p = self.values.unbind(0)
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
