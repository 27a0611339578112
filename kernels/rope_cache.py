"""Per-head Q/K RMSNorm, rotary embedding and the KV-cache write, fused.

Rotary tables are precomputed per model (`cos_sin[pos] = [cos(pos·f) | sin(pos·f)]`, shape
[max_pos, head_dim]), so every scaling scheme (llama3, YaRN) is a host-side table and the kernel
only rotates. Rotation is neox style (halves, as in Hugging Face `rotate_half`). Positions come
from a device tensor, so one captured CUDA graph serves every step. Cache layout: [kv_heads,
max_len, head_dim], and a token at position p lives at index p.
"""
from __future__ import annotations

import torch


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos_sin: [T, D] (cos in the first half, sin in the second)."""
    half = x.shape[-1] // 2
    cos = cos_sin[:, None, :half].to(x.dtype)
    sin = cos_sin[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qk_norm_rope_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Reference. q: [T, Hq, D]; k, v: [T, Hkv, D]; positions: [T] int64.

    Normalises q and k per head (when norm weights are given: Qwen3 has them, Llama not), rotates
    both, writes k and v into the caches at `positions`, and returns the rotated q.
    """
    if q_norm is not None:
        q = head_rms_norm(q, q_norm, eps)
        k = head_rms_norm(k, k_norm, eps)
    cs = cos_sin[positions]
    q = rotate(q, cs)
    k_cache[:, positions] = rotate(k, cs).transpose(0, 1).to(k_cache.dtype)
    v_cache[:, positions] = v.transpose(0, 1).to(v_cache.dtype)
    return q
