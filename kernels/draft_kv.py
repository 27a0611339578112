"""Drafter context K/V materialisation for newly committed tokens.

Every draft layer projects the same fused target feature `ctx_h`, so the K and V of all draft
layers come from one GEMM against the stacked weight `w_kv` ([layers · 2 · Hkv · D, H], per layer
k_proj rows then v_proj rows). Then per head: k-norm, rotary, and the write into each layer's
context cache at the tokens' positions. These entries never change once written.
"""
from __future__ import annotations

import torch

from .rope_cache import head_rms_norm, rotate


def draft_ctx_kv_ref(
    ctx_h: torch.Tensor,
    w_kv: torch.Tensor,
    k_norm: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Reference. ctx_h: [T, H]; k_norm: [layers, D]; positions: [T]; caches: [layers, Hkv, L, D]."""
    layers, hkv, _, d = k_cache.shape
    kv = (ctx_h @ w_kv.T).view(ctx_h.shape[0], layers, 2, hkv, d)
    cs = cos_sin[positions]
    for i in range(layers):
        k = rotate(head_rms_norm(kv[:, i, 0], k_norm[i], eps), cs)
        k_cache[i][:, positions] = k.transpose(0, 1).to(k_cache.dtype)
        v_cache[i][:, positions] = kv[:, i, 1].transpose(0, 1).to(v_cache.dtype)
