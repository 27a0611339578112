"""Per-head Q/K RMSNorm, rotary embedding and the KV-cache write, fused.

Rotary tables are precomputed per model (`cos_sin[pos] = [cos(pos·f) | sin(pos·f)]`, shape
[max_pos, rot]), so every scaling scheme (llama3, YaRN) is a host-side table and the kernel only
rotates. Rotation is neox style (halves, as in Hugging Face `rotate_half`) over the first `rot` dims
of each head; the rest pass through (Qwen3.5 rotates 64 of 256). Positions come from a device tensor,
so one captured CUDA graph serves every step. Cache layout: [kv_heads, max_len, head_dim], and a
token at position p lives at index p. The q/k norm is Qwen3's (w times the rounded normalised head)
or, with `offset`, Qwen3.5's zero-centred one ((1 + w) in float32, one rounding).

On the kernel path a step's rows (decode, verify, draft, a tree) do this inside the attention launch
(`norm_rope_rows`, called by kernels/attention.py's prologue, the same bits); this kernel serves prefill chunks.
"""
from __future__ import annotations

import torch


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos_sin: [T, rot] (cos in the first half, sin in the second): rotates x[..., :rot]."""
    rot = cos_sin.shape[-1]
    half = rot // 2
    cos = cos_sin[:, None, :half].to(x.dtype)
    sin = cos_sin[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:rot]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]), dim=-1)


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
    offset: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. q: [T, Hq, D]; k, v: [T, Hkv, D]; positions: [T] int64.

    Normalises q and k per head (when norm weights are given: Qwen3 has them, Llama not), rotates
    both, writes k and v into the caches at `positions` (at cache `rows` [T] instead, when given: a tree
    verify's nodes, whose positions repeat), and returns the rotated q.
    """
    if q_norm is not None:
        q = head_rms_norm(q, q_norm, eps, offset)
        k = head_rms_norm(k, k_norm, eps, offset)
    cs = cos_sin[positions]
    q = rotate(q, cs)
    rows = positions if rows is None else rows
    k_cache[:, rows] = rotate(k, cs).transpose(0, 1).to(k_cache.dtype)
    v_cache[:, rows] = v.transpose(0, 1).to(v_cache.dtype)
    return q


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def norm_rope(x1, x2, x3, w_ptr, cs_ptr, half, rot, d, eps, HAS_NORM: tl.constexpr, OFFSET: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, DTYPE: tl.constexpr):
    """Per-head RMSNorm (optional) then neox rotation of one head given as three fp32 parts: the two
    rotated halves x1, x2 (`half` dims each) and the `d - rot` dims that pass through (x3). Values are
    rounded to DTYPE where the reference rounds (after the norm)."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    p_offs = rot + tl.arange(0, BLOCK_P)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0) + tl.sum(x3 * x3, axis=0)) / d + eps)
        w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs, mask=mask, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + p_offs, mask=p_offs < d, other=0.0).to(tl.float32)
        if OFFSET:
            x1 = (x1 * rstd * (1.0 + w1)).to(DTYPE).to(tl.float32)
            x2 = (x2 * rstd * (1.0 + w2)).to(DTYPE).to(tl.float32)
            x3 = (x3 * rstd * (1.0 + w3)).to(DTYPE).to(tl.float32)
        else:
            x1 = (w1 * (x1 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
            x3 = (w3 * (x3 * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    cos = tl.load(cs_ptr + offs, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    sin = tl.load(cs_ptr + half + offs, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, x3


@triton.jit
def load_head(src, half, rot, d, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """A head's rotated halves and its pass-through dims, in fp32."""
    offs = tl.arange(0, BLOCK_H)
    p_offs = rot + tl.arange(0, BLOCK_P)
    x1 = tl.load(src + offs, mask=offs < half, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=offs < half, other=0.0).to(tl.float32)
    x3 = tl.load(src + p_offs, mask=p_offs < d, other=0.0).to(tl.float32)
    return x1, x2, x3


@triton.jit
def store_head(dst, o1, o2, o3, half, rot, d, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_H)
    p_offs = rot + tl.arange(0, BLOCK_P)
    dt = dst.dtype.element_ty
    tl.store(dst + offs, o1.to(dt), mask=offs < half)
    tl.store(dst + half + offs, o2.to(dt), mask=offs < half)
    tl.store(dst + p_offs, o3.to(dt), mask=p_offs < d)


@triton.jit
def _qk_norm_rope_cache_kernel(q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, cs_ptr, pos_ptr, rows_ptr, kc_ptr, vc_ptr, qo_ptr,
                               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, n_q_heads, capacity, half, rot, d, eps,
                               HAS_NORM: tl.constexpr, OFFSET: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    cs = cs_ptr + pos * rot
    dtype = qo_ptr.dtype.element_ty
    if h < n_q_heads:
        x1, x2, x3 = load_head(q_ptr + t * sq_t + h * sq_h, half, rot, d, BLOCK_H, BLOCK_P)
        o1, o2, o3 = norm_rope(x1, x2, x3, qn_ptr, cs, half, rot, d, eps, HAS_NORM, OFFSET, BLOCK_H, BLOCK_P, dtype)
        store_head(qo_ptr + (t * n_q_heads + h) * d, o1, o2, o3, half, rot, d, BLOCK_H, BLOCK_P)
    else:
        j = h - n_q_heads
        x1, x2, x3 = load_head(k_ptr + t * sk_t + j * sk_h, half, rot, d, BLOCK_H, BLOCK_P)
        o1, o2, o3 = norm_rope(x1, x2, x3, kn_ptr, cs, half, rot, d, eps, HAS_NORM, OFFSET, BLOCK_H, BLOCK_P, dtype)
        row = (j.to(tl.int64) * capacity + tl.load(rows_ptr + t)) * d  # rows_ptr: the positions, or a tree's rows
        store_head(kc_ptr + row, o1, o2, o3, half, rot, d, BLOCK_H, BLOCK_P)
        dims = tl.arange(0, BLOCK_D)
        vals = tl.load(v_ptr + t * sv_t + j * sv_h + dims, mask=dims < d)
        tl.store(vc_ptr + row + dims, vals.to(vc_ptr.dtype.element_ty), mask=dims < d)


@triton.jit
def norm_rope_rows(src_ptr, src_off, dst_ptr, dst_off, pos, row_ok, w_ptr, cs_ptr, half, rot, d, eps,
                   HAS_NORM: tl.constexpr, OFFSET: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """A tile of heads, row r at src_ptr + src_off[r] at position pos[r], normed and rotated as `norm_rope`
    does one head, and stored at dst_ptr + dst_off[r] (the attention kernel's prologue: kernels/attention.py).
    The same sums per row (the rotated halves, then the dims that pass through, each over as many lanes), and
    each dim by the same expression, its rotation partner loaded beside it: the bits of
    `_qk_norm_rope_cache_kernel`. Row by row alone: a row's bits do not depend on the others in the tile."""
    dims = tl.arange(0, BLOCK_D)
    partner = tl.where(dims < half, dims + half, tl.where(dims < rot, dims - half, dims))  # x2 for x1, x1 for x2
    ok = row_ok[:, None] & (dims < d)[None, :]
    src = src_ptr + src_off[:, None]
    x = tl.load(src + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(src + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        offs = tl.arange(0, BLOCK_H)
        p_offs = rot + tl.arange(0, BLOCK_P)
        h_ok = row_ok[:, None] & (offs < half)[None, :]
        x1 = tl.load(src + offs[None, :], mask=h_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + offs[None, :], mask=h_ok, other=0.0).to(tl.float32)
        x3 = tl.load(src + p_offs[None, :], mask=row_ok[:, None] & (p_offs < d)[None, :], other=0.0).to(tl.float32)
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1) + tl.sum(x3 * x3, axis=1)
        rstd = (1.0 / tl.sqrt(ss / d + eps))[:, None]
        w = tl.load(w_ptr + dims, mask=dims < d, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner, mask=dims < d, other=0.0).to(tl.float32)[None, :]
        if OFFSET:
            x = (x * rstd * (1.0 + w)).to(DTYPE).to(tl.float32)
            xp = (xp * rstd * (1.0 + wp)).to(DTYPE).to(tl.float32)
        else:
            x = (w * (x * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
            xp = (wp * (xp * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    at = tl.where(dims < half, dims, dims - half)[None, :]  # the table's column (for dims < rot)
    rope_ok = row_ok[:, None] & (dims < rot)[None, :]
    cs = cs_ptr + (pos * rot)[:, None]
    cos = tl.load(cs + at, mask=rope_ok, other=0.0).to(DTYPE).to(tl.float32)
    sin = tl.load(cs + half + at, mask=rope_ok, other=0.0).to(DTYPE).to(tl.float32)
    out = tl.where((dims < half)[None, :], x * cos - xp * sin, x * cos + xp * sin)
    out = tl.where((dims < rot)[None, :], out, x)
    tl.store(dst_ptr + dst_off[:, None] + dims[None, :], out.to(dst_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_rope_cache(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache, offset=False,
                       rows=None) -> torch.Tensor:
    """Triton: same contract as `qk_norm_rope_cache_ref`; one program per (token, head)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    t, hq, d = q.shape
    hkv, rot = k.shape[1], cos_sin.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[0] == hkv and rot % 2 == 0
    assert cos_sin.is_contiguous() and rot <= d, (cos_sin.shape, d)
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    has_norm = q_norm is not None
    if t:
        _qk_norm_rope_cache_kernel[(t, hq + hkv)](
            q, k, v, q_norm if has_norm else q, k_norm if has_norm else k, cos_sin, positions,
            positions if rows is None else rows, k_cache, v_cache,
            out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), hq,
            k_cache.shape[1], rot // 2, rot, d, eps, HAS_NORM=has_norm, OFFSET=offset,
            BLOCK_H=triton.next_power_of_2(rot // 2), BLOCK_P=max(1, triton.next_power_of_2(d - rot)),
            BLOCK_D=triton.next_power_of_2(d))
    return out
