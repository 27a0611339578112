"""Attention of new queries over a static KV cache, with GQA.

The Triton kernel serves decode, verify and draft (a few queries, many keys); on a GPU the
reference also serves prefill chunks, through SDPA (see `dflash_cli/ops.py`).

The queries sit at the last `q_len` positions of the valid cache (`kv_len` read from a device
tensor). `causal=True` is the target's verify/decode pattern; `causal=False` is the drafter's: the
block sees all cached context and itself, bidirectionally. An optional sliding window limits keys
to those within `window` positions of the query (Hugging Face convention: key j is visible from
query i when i - j < window). Optional per-head attention sinks (gpt-oss) are one more logit per
query head in the softmax's denominator, whose probability mass is then dropped:
out = softmax([s, sink])[:-1] · v = softmax(s) · v · sigmoid(lse(s) - sink).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


@functools.cache
def _lower_right_gqa() -> bool:
    """Whether this torch's lower-right causal bias forwards `enable_gqa` (a feature test, not a guess).
    Asked for on a GPU only: torch.nn.attention.bias imports torch._dynamo, 1-2 s of every start."""
    from torch.nn.attention.bias import CausalBias

    return "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters


def __getattr__(name: str):  # `_LOWER_RIGHT_GQA`, computed when first read (PEP 562)
    if name == "_LOWER_RIGHT_GQA":
        return _lower_right_gqa()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. q: [Tq, Hq, D]; caches: [Hkv, max_len, D]; kv_len: 0-d int64 (or an int, as a
    prefill chunk gives it); sinks: [Hq] float32 logits or None. Returns [Tq, Hq, D].

    mask: [Tq, n] bool, which of the cache's first n slots each query sees (a tree verify's ancestor
    mask, dflash_cli/tree.py); it replaces kv_len, `causal` and the window (its shape is static: no
    host read)."""
    if mask is not None:
        k, v = k_cache[:, :mask.shape[1]], v_cache[:, :mask.shape[1]]
        if sinks is not None:
            return _attention_with_sinks(q, k, v, mask, scale, sinks)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)
    n, tq = int(kv_len), q.shape[0]
    k, v = k_cache[:, :n], v_cache[:, :n]
    if sinks is not None:
        return _attention_with_sinks(q, k, v, _mask(tq, n, causal, sliding_window, q.device), scale, sinks)
    if sliding_window is None and not causal:
        mask = None
    elif sliding_window is None and q.is_cuda and _lower_right_gqa():
        # No mask tensor: SDPA can pick flash attention (GQA included, O(n) memory) for a long
        # prefill chunk; a boolean mask would rule it out, and on older torch fall back to the
        # math kernel, which materialises every score. The queries are the last tq positions.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(tq, n)
    else:
        mask = _mask(tq, n, causal, sliding_window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def _mask(tq: int, n: int, causal: bool, sliding_window: int | None, device) -> torch.Tensor:
    """[tq, n] bool: which of the n keys each of the last tq positions sees."""
    q_pos = torch.arange(n - tq, n, device=device)[:, None]
    k_pos = torch.arange(n, device=device)[None, :]
    mask = k_pos <= q_pos if causal else torch.ones(tq, n, dtype=torch.bool, device=device)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    return mask


def _attention_with_sinks(q, k, v, mask, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax over [scores, sink] with the sink's share dropped, as transformers' eager gpt-oss
    (SDPA has no sinks): the explicit product, in the activations' dtype."""
    group = q.shape[1] // k.shape[0]
    kf, vf = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [Hq, n, D]
    s = torch.matmul(q.transpose(0, 1), kf.transpose(1, 2)) * scale  # [Hq, Tq, n]
    s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.to(s.dtype).view(-1, 1, 1).expand(-1, s.shape[1], 1)
    logits = torch.cat((s, sink), dim=-1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), vf).transpose(0, 1)


# ---- Triton: split-K "flash-decoding" -------------------------------------------------------
# Grid (kv head, split, row block): each program takes up to BLOCK_M query rows of one kv head
# (query token × the head's GQA group) and one slice of the keys, runs an online softmax over it
# and writes a partial result; a second kernel merges the splits. The launch shape depends only on
# the cache's capacity; the slices are cut on the device from kv_len (and the sliding window), so
# every split has work at any length, keys past kv_len are never read, and one launch (one CUDA
# graph) serves every step.
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Triton's CPU interpreter mis-computes tl.dot on bfloat16 operands (seen with triton 3.9): under
# TRITON_INTERPRET the operands are upcast to float32 first. On a GPU the dots stay in bf16.
_UPCAST_DOTS = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_N = 32  # keys per step (16 for 256-wide heads: see _launch_shape)
_MIN_CHUNK = 128  # fewest keys per split: smaller slices cost more in partials than they save
_TARGET_PROGRAMS = 256  # splits × kv heads × row blocks to aim for (an H200 has 132 SMs)


@triton.jit
def _key_range(len_ptr, q_len, window, n_splits, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
               MIN_CHUNK: tl.constexpr):
    """Keys the queries can see, [lo, kv_len), cut into slices of `size` (a multiple of BLOCK_N)."""
    kv_len = tl.load(len_ptr).to(tl.int32)
    lo = kv_len * 0
    if WINDOW:  # the first query sees keys j > kv_len - q_len - window
        lo = tl.maximum(kv_len - q_len - window + 1, 0) // BLOCK_N * BLOCK_N
    size = tl.cdiv(tl.cdiv(kv_len - lo, n_splits), BLOCK_N) * BLOCK_N
    return kv_len, lo, tl.maximum(size, MIN_CHUNK)


@triton.jit(do_not_specialize=["q_len"])  # q_len varies (prefill tails): no recompile per value
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, m_ptr, l_ptr,
                       q_len, group, capacity, n_splits, n_rows, window, scale,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    kv_len, lo, size = _key_range(len_ptr, q_len, window, n_splits, WINDOW, BLOCK_N, MIN_CHUNK)
    start = lo + split * size
    if start < kv_len:  # splits past the keys write nothing: the merge counts them out the same way
        end = tl.minimum(start + size, kv_len)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = t * group + g
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
        base = kvh.to(tl.int64) * capacity * D
        for n0 in range(start, end, BLOCK_N):
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
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(v_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = (kvh * n_splits + split) * n_rows + rows
        tl.store(acc_ptr + out[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, l, mask=row_ok)


@triton.jit(do_not_specialize=["q_len"])
def _attn_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, len_ptr, sinks_ptr, q_len, group, n_splits, n_rows, window,
                       WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MIN_CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, SINKS: tl.constexpr):
    kvh = tl.program_id(0)
    r = tl.program_id(1)  # one query row (token, head)
    kv_len, lo, size = _key_range(len_ptr, q_len, window, n_splits, WINDOW, BLOCK_N, MIN_CHUNK)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < tl.cdiv(kv_len - lo, size)  # the splits that had keys
    idx = (kvh * n_splits + splits) * n_rows + r
    m = tl.load(m_ptr + idx, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + idx, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    head = kvh * group + r % group
    if SINKS:  # the sink is one more logit in the denominator: m* = max(m_s, sink), l += e^(sink - m*)
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    dims = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + idx[:, None] * BLOCK_D + dims[None, :], mask=s_ok[:, None], other=0.0)
    denominator = tl.sum(l * w, axis=0)
    if SINKS:
        denominator += tl.exp(sink - m_max)
    out = tl.sum(acc * w[:, None], axis=0) / denominator
    t = r // group
    n_heads = tl.num_programs(0) * group
    tl.store(o_ptr + (t * n_heads + head) * D + dims, out.to(o_ptr.dtype.element_ty), mask=dims < D)


def _launch_shape(block_d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(keys per step, pipeline stages) whose K/V tiles fit the 99 KB of shared memory a block gets on
    sm_86/sm_89 (RTX 30xx/40xx) as well as the larger A100/H100 budgets: three stages of 32 keys of 128
    bf16 dims use 75 KB, but 256-wide heads (Qwen3.5) or float32 tiles would need 105-140 KB
    (tests/kernels/compile_kernels.py compiles every launch for each target and checks). Decode-shaped
    attention is bound by reading the cache: a shallower pipeline costs little."""
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    stages = 3 if row_bytes <= 256 else 2 if row_bytes <= 512 else 1
    return (16 if block_d >= 256 else _BLOCK_N), stages


def attention(q, k_cache, v_cache, kv_len, *, causal: bool, scale: float, sliding_window: int | None = None,
              sinks: torch.Tensor | None = None, n_splits: int | None = None):
    """Triton: same contract as `attention_ref` (caches contiguous, as the engine allocates them;
    kv_len a device tensor). `n_splits` overrides the split count (tests sweep it)."""
    q = q.contiguous()
    tq, hq, d = q.shape
    hkv, capacity, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert hq % hkv == 0 and k_cache.shape[2] == d, (q.shape, k_cache.shape)
    group = hq // hkv
    block_m = min(64, max(16, triton.next_power_of_2(tq * group)))
    row_blocks = triton.cdiv(tq * group, block_m)
    n_rows = row_blocks * block_m
    block_d = max(16, triton.next_power_of_2(d))
    block_n, stages = _launch_shape(block_d, q.dtype)
    if n_splits is None:
        n_splits = max(1, min(triton.cdiv(capacity, _MIN_CHUNK), _TARGET_PROGRAMS // (hkv * row_blocks)))
    acc = torch.empty((hkv * n_splits * n_rows, block_d), dtype=torch.float32, device=q.device)
    m = torch.empty((hkv * n_splits * n_rows,), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    window = sliding_window or 0
    _attn_split_kernel[(hkv, n_splits, row_blocks)](
        q, k_cache, v_cache, kv_len, acc, m, l, tq, group, capacity, n_splits, n_rows, window, scale,
        CAUSAL=causal, WINDOW=sliding_window is not None, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        MIN_CHUNK=_MIN_CHUNK, UPCAST=_UPCAST_DOTS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; bf16 uses tensor cores
        num_warps=4 if block_m * block_d <= 64 * 128 else 8, num_stages=stages)
    out = torch.empty_like(q)
    _attn_merge_kernel[(hkv, tq * group)](
        acc, m, l, out, kv_len, sinks if sinks is not None else m, tq, group, n_splits, n_rows, window,
        WINDOW=sliding_window is not None, D=d, BLOCK_D=block_d, BLOCK_N=block_n, MIN_CHUNK=_MIN_CHUNK,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), SINKS=sinks is not None)
    return out
