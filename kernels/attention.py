"""Attention of a few queries (q_len <= block size) over a static KV cache, with GQA.

The queries sit at the last `q_len` positions of the valid cache (`kv_len` read from a device
tensor). `causal=True` is the target's verify/decode pattern; `causal=False` is the drafter's: the
block sees all cached context and itself, bidirectionally. An optional sliding window limits keys
to those within `window` positions of the query (Hugging Face convention: key j is visible from
query i when i - j < window).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference. q: [Tq, Hq, D]; caches: [Hkv, max_len, D]; kv_len: 0-d int64. Returns [Tq, Hq, D]."""
    n, tq = int(kv_len), q.shape[0]
    k, v = k_cache[:, :n], v_cache[:, :n]
    q_pos = torch.arange(n - tq, n, device=q.device)[:, None]
    k_pos = torch.arange(n, device=q.device)[None, :]
    mask = k_pos <= q_pos if causal else torch.ones(tq, n, dtype=torch.bool, device=q.device)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


# ---- Triton: split-K "flash-decoding" -------------------------------------------------------
# Grid (kv head, split): each program takes all query rows of one kv head (q_len × group, GQA)
# and one slice of the cache, runs an online softmax over it, and writes a partial result; a
# second kernel merges the splits. Splits cover the cache's capacity and stop at kv_len, read on
# the device, so one launch configuration (and one CUDA graph) serves every length.
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Triton's CPU interpreter mis-computes tl.dot on bfloat16 operands (seen with triton 3.9): under
# TRITON_INTERPRET the operands are upcast to float32 first. On a GPU the dots stay in bf16.
_UPCAST_DOTS = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                       q_len, group, capacity, split_size, n_splits, window, scale,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    kv_len = tl.load(len_ptr)
    rows = tl.arange(0, BLOCK_M)  # row r = t * group + g  →  query token t, head kvh * group + g
    t = rows // group
    g = rows % group
    row_ok = rows < q_len * group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    n_heads = tl.num_programs(0) * group
    q = tl.load(q_ptr + ((t * n_heads + kvh * group + g) * D)[:, None] + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = kv_len - q_len + t
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    base = kvh.to(tl.int64) * capacity * D
    for n0 in range(start, start + split_size, BLOCK_N):
        if n0 < end:
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            kv_off = base + keys[:, None] * D + dims[None, :]
            k = tl.load(k_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            ok = key_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                ok = ok & (keys[None, :] <= q_pos[:, None])
            if WINDOW:
                ok = ok & (q_pos[:, None] - keys[None, :] < window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(v_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
    out = (kvh * n_splits + split) * BLOCK_M + rows
    tl.store(acc_ptr + out[:, None] * BLOCK_D + dims[None, :], acc)
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, l)


@triton.jit
def _attn_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, group, n_splits, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    kvh = tl.program_id(0)
    r = tl.program_id(1)  # one query row (token, head)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < n_splits
    idx = (kvh * n_splits + splits) * BLOCK_M + r
    m = tl.load(m_ptr + idx, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + idx, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    dims = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + idx[:, None] * BLOCK_D + dims[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    t = r // group
    head = kvh * group + r % group
    n_heads = tl.num_programs(0) * group
    tl.store(o_ptr + (t * n_heads + head) * D + dims, out.to(o_ptr.dtype.element_ty), mask=dims < D)


def attention(q, k_cache, v_cache, kv_len, *, causal: bool, scale: float, sliding_window: int | None = None):
    """Triton: same contract as `attention_ref`; q_len × group must fit one block of rows (≤ 128)."""
    q = q.contiguous()
    tq, hq, d = q.shape
    hkv, capacity, _ = k_cache.shape
    group = hq // hkv
    block_m = max(16, triton.next_power_of_2(tq * group))
    block_n, block_d = 32, max(16, triton.next_power_of_2(d))
    n_splits = max(1, min(64, triton.cdiv(capacity, 512)))
    split_size = triton.cdiv(triton.cdiv(capacity, n_splits), block_n) * block_n
    n_splits = triton.cdiv(capacity, split_size)
    acc = torch.empty((hkv * n_splits * block_m, block_d), dtype=torch.float32, device=q.device)
    m = torch.empty((hkv * n_splits * block_m,), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _attn_split_kernel[(hkv, n_splits)](
        q, k_cache, v_cache, kv_len, acc, m, l, tq, group, capacity, split_size, n_splits,
        sliding_window or 0, scale, CAUSAL=causal, WINDOW=sliding_window is not None, D=d, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=_UPCAST_DOTS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays exact; bf16 uses tensor cores
    out = torch.empty_like(q)
    _attn_merge_kernel[(hkv, tq * group)](acc, m, l, out, group, n_splits, D=d, BLOCK_D=block_d,
                                          BLOCK_M=block_m, BLOCK_S=max(2, triton.next_power_of_2(n_splits)))
    return out
