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
    b_kv: torch.Tensor | None = None,
) -> None:
    """Reference. ctx_h: [T, H]; k_norm: [layers, D]; positions: [T], or the 0-d position of the first token
    (the others follow it); caches: [layers, Hkv, L, D]; b_kv: the projection's bias (gpt-oss drafters), added
    before the k-norm."""
    layers, hkv, _, d = k_cache.shape
    if positions.dim() == 0:
        positions = positions + torch.arange(ctx_h.shape[0], device=positions.device)
    kv = _project(ctx_h, w_kv, b_kv).view(ctx_h.shape[0], layers, 2, hkv, d)
    cs = cos_sin[positions]
    for i in range(layers):
        k = rotate(head_rms_norm(kv[:, i, 0], k_norm[i], eps), cs)
        k_cache[i][:, positions] = k.transpose(0, 1).to(k_cache.dtype)
        v_cache[i][:, positions] = kv[:, i, 1].transpose(0, 1).to(v_cache.dtype)


def _project(ctx_h: torch.Tensor, w_kv: torch.Tensor, b_kv: torch.Tensor | None) -> torch.Tensor:
    from dflash_cli import ops  # the Linear seam: DFLASH_LINEAR=invariant covers the drafter's context too

    return ops.dense_linear(ctx_h, w_kv, b_kv)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .rope_cache import load_head, norm_rope, store_head  # noqa: E402


@triton.jit
def _ctx_kv_kernel(kv_ptr, kn_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, n_layers, n_heads, capacity, half,
                   eps, BLOCK_H: tl.constexpr, FOLLOW: tl.constexpr):
    t = tl.program_id(0)
    lh = tl.program_id(1)  # layer * n_heads + head
    layer = lh // n_heads
    head = lh % n_heads
    d = 2 * half
    if FOLLOW:  # pos_ptr: the first token's position, the others follow it (no positions tensor to make)
        pos = tl.load(pos_ptr) + t
    else:
        pos = tl.load(pos_ptr + t)
    base = kv_ptr + ((t * n_layers + layer) * 2 * n_heads) * d  # kv: [T, layers, 2, heads, D]
    dtype = kc_ptr.dtype.element_ty
    x1, x2, x3 = load_head(base + head * d, half, d, d, BLOCK_H, 1)
    o1, o2, o3 = norm_rope(x1, x2, x3, kn_ptr + layer * d, cs_ptr + pos * d, half, d, d, eps, True, False,
                           BLOCK_H, 1, dtype)
    row = ((layer.to(tl.int64) * n_heads + head) * capacity + pos) * d
    store_head(kc_ptr + row, o1, o2, o3, half, d, d, BLOCK_H, 1)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    v_src = base + (n_heads + head) * d
    tl.store(vc_ptr + row + offs, tl.load(v_src + offs, mask=mask), mask=mask)
    tl.store(vc_ptr + row + half + offs, tl.load(v_src + half + offs, mask=mask), mask=mask)


def draft_ctx_kv(ctx_h, w_kv, k_norm, eps, cos_sin, positions, k_cache, v_cache, b_kv=None) -> None:
    """Triton: one GEMM for all draft layers' K and V, then one kernel for k-norm, rope and the
    cache writes of every (token, layer, head); `positions` as in the reference."""
    layers, hkv, capacity, d = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert k_norm.is_contiguous() and cos_sin.is_contiguous() and w_kv.shape[0] == layers * 2 * hkv * d
    kv = _project(ctx_h, w_kv, b_kv).contiguous()
    t = ctx_h.shape[0]
    if t:
        _ctx_kv_kernel[(t, layers * hkv)](kv, k_norm, cos_sin, positions, k_cache, v_cache, layers, hkv, capacity,
                                          d // 2, eps, BLOCK_H=triton.next_power_of_2(d // 2),
                                          FOLLOW=positions.dim() == 0)
