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


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def norm_rope_halves(x1, x2, w_ptr, cs_ptr, half, eps, HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr,
                     DTYPE: tl.constexpr):
    """Per-head RMSNorm (optional) then neox rotation of one head given as its two halves (fp32).
    Values are rounded to DTYPE where the reference rounds (after the norm)."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * half) + eps)
        w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    cos = tl.load(cs_ptr + offs, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    sin = tl.load(cs_ptr + half + offs, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _qk_norm_rope_cache_kernel(q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, cs_ptr, pos_ptr, kc_ptr, vc_ptr, qo_ptr,
                               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, n_q_heads, capacity, half, eps,
                               HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    pos = tl.load(pos_ptr + t)
    cs = cs_ptr + pos * (2 * half)
    dtype = qo_ptr.dtype.element_ty
    if h < n_q_heads:
        src = q_ptr + t * sq_t + h * sq_h
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = norm_rope_halves(x1, x2, qn_ptr, cs, half, eps, HAS_NORM, BLOCK_H, dtype)
        dst = qo_ptr + (t * n_q_heads + h) * (2 * half)
        tl.store(dst + offs, o1.to(dtype), mask=mask)
        tl.store(dst + half + offs, o2.to(dtype), mask=mask)
    else:
        j = h - n_q_heads
        src = k_ptr + t * sk_t + j * sk_h
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = norm_rope_halves(x1, x2, kn_ptr, cs, half, eps, HAS_NORM, BLOCK_H, dtype)
        row = (j.to(tl.int64) * capacity + pos) * (2 * half)
        cdt = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + row + offs, o1.to(cdt), mask=mask)
        tl.store(kc_ptr + row + half + offs, o2.to(cdt), mask=mask)
        vsrc = v_ptr + t * sv_t + j * sv_h
        tl.store(vc_ptr + row + offs, tl.load(vsrc + offs, mask=mask).to(cdt), mask=mask)
        tl.store(vc_ptr + row + half + offs, tl.load(vsrc + half + offs, mask=mask).to(cdt), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_rope_cache(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache) -> torch.Tensor:
    """Triton: same contract as `qk_norm_rope_cache_ref`; one program per (token, head)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[0] == hkv and d % 2 == 0
    assert cos_sin.is_contiguous() and cos_sin.shape[1] == d, (cos_sin.shape, d)
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    has_norm = q_norm is not None
    if t:
        _qk_norm_rope_cache_kernel[(t, hq + hkv)](
            q, k, v, q_norm if has_norm else q, k_norm if has_norm else k, cos_sin, positions, k_cache, v_cache,
            out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), hq,
            k_cache.shape[1], d // 2, eps, HAS_NORM=has_norm, BLOCK_H=triton.next_power_of_2(d // 2))
    return out
