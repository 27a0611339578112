"""Rotary position tables: one [max_pos, head_dim] table of [cos | sin] per model.

Every scaling scheme becomes a table here, on the host, once; the kernels only rotate. The
formulas follow Hugging Face's `modeling_rope_utils` so float32 results match transformers.
"""
from __future__ import annotations

import math

import torch

from .errors import DflashError


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention factor that scales cos and sin."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "proportional":
        return _proportional(head_dim, theta, scaling), 1.0
    raise DflashError(f"unsupported rope scaling type '{kind}' in config.json "
                      "(dflash runs default, linear, llama3, yarn and proportional rope)")


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _proportional(head_dim: int, theta: float, s: dict) -> torch.Tensor:
    """Gemma 4's global layers: the first `partial_rotary_factor` of the frequency pairs are the default
    rope's over the whole head (exponents over head_dim, not over the rotated part), the rest are zero
    (cos 1, sin 0: those pairs pass through), so the table still spans the whole head."""
    angles = int(s.get("partial_rotary_factor", 1.0) * head_dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim
    inv_freq = torch.cat((1.0 / (theta**exponents), torch.zeros(head_dim // 2 - angles)))
    return inv_freq / s.get("factor", 1.0)


def _yarn(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor, old_len = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_table(
    head_dim: int, theta: float, scaling: dict | None, max_pos: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """float32 [max_pos, head_dim]: cos(p·f)·a in the first half, sin(p·f)·a in the second."""
    inv_freq, attention_factor = inv_frequencies(head_dim, theta, scaling)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    table = torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)
    return table.to(device)
