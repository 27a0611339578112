"""A family's checkpoint weight table: every tensor it reads, by its name in the released checkpoint.

One table per family, written once, serves three readers: the loader (which tensors to read, in which
dtype, with which shape: a mismatch is a one-line error naming the tensor), the test builders (tiny
checkpoints in the exact released layout, with random values drawn as `init` says), and the
synthetic bench (random weights at a released model's real shapes, straight on the device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Weight:
    name: str  # as stored in the checkpoint
    shape: tuple[int, ...]
    init: str = "linear"  # how a random stand-in is drawn (see `random_tensor`)
    gain: float = 1.0  # scale of a random "linear" weight, times 1/sqrt(fan_in)
    dtype: str = "model"  # "model": the run's dtype; "float32": always fp32 (state parameters); "raw": as stored
    fallback: str | None = None  # the tensor to use when this one is absent (an untied lm_head → the embedding)


def random_tensor(w: Weight, g: torch.Generator) -> torch.Tensor:
    """A float32 stand-in (on the generator's device) that keeps activations O(1) through a random
    network, so that a random tiny model's greedy continuations still depend on the context."""
    shape, dev = w.shape, g.device
    if w.init == "linear":  # projections: unit-variance outputs for unit-variance inputs
        return torch.randn(shape, generator=g, device=dev) * (w.gain / math.sqrt(shape[-1]))
    if w.init == "linear_in":  # the same, stored [..., in, out] (transformers' gpt-oss experts)
        return torch.randn(shape, generator=g, device=dev) * (w.gain / math.sqrt(shape[-2]))
    if w.init == "mxfp4_blocks":  # u8, two random e2m1 values per byte (mean |value| about 2.6)
        return torch.randint(0, 256, shape, generator=g, device=dev, dtype=torch.uint8)
    if w.init == "mxfp4_scales":  # u8 e8m0 exponents: weights of about 1/sqrt(fan_in), fan_in = groups · 32
        exponent = 127 - round(math.log2(2.6 * math.sqrt(32 * shape[-1])))
        return torch.full(shape, exponent, device=dev, dtype=torch.uint8)
    if w.init == "embed":
        return torch.randn(shape, generator=g, device=dev)
    if w.init == "norm":  # RMSNorm weight applied as w
        return 1.0 + 0.1 * torch.randn(shape, generator=g, device=dev)
    if w.init == "zero_norm":  # zero-centred RMSNorm weight applied as (1 + w)
        return 0.1 * torch.randn(shape, generator=g, device=dev)
    if w.init == "taps":  # DFlash2's conv base kernels [2, K, H]: near identity (tap 0 ≈ 1, later taps ≈ 0)
        return torch.randn(shape, generator=g, device=dev) * 0.1 + (torch.arange(shape[1], device=dev) == 0)[:, None]
    if w.init == "conv":  # a depthwise causal conv [channels, 1, K]
        return torch.randn(shape, generator=g, device=dev) / math.sqrt(shape[-1])
    if w.init == "a_log":  # Gated DeltaNet decay rates: log U(1, 16)
        return torch.empty(shape, device=dev).uniform_(1.0, 16.0, generator=g).log()
    if w.init == "uniform":  # U(0, 1), e.g. dt_bias
        return torch.rand(shape, generator=g, device=dev)
    if w.init == "normal":  # N(0, gain²): biases, sinks
        return w.gain * torch.randn(shape, generator=g, device=dev)
    raise ValueError(f"unknown init '{w.init}' for {w.name}")


def random_weights(table: list[Weight], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random tensors for every weight of `table`, drawn in table order from one seeded generator on
    `device` (a synthetic 8B model never passes through host memory). "raw" weights keep the dtype
    they are drawn in (packed bytes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    policy = {"model": dtype, "float32": torch.float32, "raw": None}
    return {w.name: random_tensor(w, g).to(policy[w.dtype]) for w in table}


def table_bytes(table: list[Weight], dtype: torch.dtype) -> int:
    """Bytes the table's weights take once loaded (fallbacks share their tensor)."""
    size = torch.tensor([], dtype=dtype).element_size()
    per = {"model": size, "float32": 4, "raw": 1}
    return sum(math.prod(w.shape) * per[w.dtype] for w in table)
