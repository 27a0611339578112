"""Attention of new queries over a static KV cache, with GQA.

The Triton kernel serves decode, verify and draft (a few queries, many keys), batch-invariant: a
query row's output is the same bits alone (decode) as in a block of up to 32 (verify, draft), in
bf16 as in fp32 (the kernel's notes below say how, and what its fixed split size costs). On a GPU
the reference also serves prefill chunks, through SDPA (see `dflash_cli/ops.py`).

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
from dataclasses import dataclass

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
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference. q: [Tq, Hq, D]; caches: [Hkv, max_len, D]; kv_len: 0-d int64 (or an int, as a
    prefill chunk gives it); sinks: [Hq] float32 logits or None. Returns [Tq, Hq, D].

    mask: [Tq, n] bool, which of the cache's first n slots each query sees (a tree verify's ancestor
    mask, dflash_cli/tree.py); it replaces kv_len, `causal` and the window (its shape is static: no
    host read). gate: [Tq, Hq, D] or None: the output times sigmoid(gate) (Qwen3.5's gated attention)."""
    out = _attention_ref(q, k_cache, v_cache, kv_len, causal, scale, sliding_window, sinks, mask)
    return out if gate is None else out * torch.sigmoid(gate)


def _attention_ref(q, k_cache, v_cache, kv_len, causal, scale, sliding_window, sinks, mask) -> torch.Tensor:
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


# ---- Triton: split-K "flash-decoding" at absolute key positions ------------------------------
# Batch invariance by construction: a query row's output is the same bits whether it is computed as a
# decode step (one query, kv_len = p + 1), inside a verify block (b queries, kv_len = p0 + b) or in a
# drafter's block, so speculative decoding equals plain decoding in bf16 as well as in fp32.
#   * The keys are cut into splits of SPLIT keys at absolute positions (split i holds keys
#     [i * SPLIT, (i + 1) * SPLIT), counted from position 0), never from kv_len or the query count.
#   * Inside a split the keys are visited in BLOCK_N tiles aligned to absolute positions, in ascending
#     order, with one online softmax per query row (the row's max, sum and fp32 accumulator).
#   * The merge visits the splits in ascending order, _MERGE_CHUNK at a time (chunk c holds splits
#     [c * _MERGE_CHUNK, (c + 1) * _MERGE_CHUNK)): a fixed tree inside a chunk, a chain across chunks,
#     for each query row alone. The sinks (gpt-oss) enter once, after the last chunk.
#   * Keys a row cannot see (past its causal limit, outside its window, past kv_len) are exact
#     neutrals: their weight is exp(-inf) = 0, and a tile or split that adds nothing keeps the running
#     max, so its rescale factor is exp(0) = 1 exactly. So skipping such keys (a decode step never
#     reaches the keys a verify block adds after it) and visiting them (the verify block must, for its
#     later rows) give the same bits, and so do the splits a window leaves out entirely.
#   * One compiled configuration for every query count: BLOCK_M query rows per program (the query
#     token × its GQA group, row r = t * group + g), BLOCK_N, warps and stages follow only the head
#     size and dtype. Tensor-core dots compute each output element alone, so a row's scores do not
#     depend on the rows beside it.
# Grid (row block, split, kv head): fixed by the cache's capacity, so one launch (one CUDA graph)
# serves every step; kv_len is read on the device and programs whose split holds no visible key exit
# at once (their partials are never read).
#
# One launch, not two (issue 26): each split with a visible key stores its partials, then draws a ticket
# from its (row block, kv head)'s counter (a barrier, then an acq_rel atomic: its stores are visible to
# whoever draws later); the one that draws the last ticket (the count of such splits follows from kv_len)
# merges, as `_merge_rows` always did (the same order, so the same bits as the two-launch form, kept as
# the reference), applies the output gate if any (Qwen3.5: out × sigmoid(gate), rounded as torch rounds),
# and sets the counter back to zero. The counters are allocated zeroed once per device and stream and
# reused by every launch (a captured graph replays them from zero).
#
# A tree verify (issue 28, `tree=`): node t sits at position base + depth(t) (base = kv_len - q_len), its
# K/V at cache row base + t. The tiles of committed keys only are shared by the whole block as above. The
# tiles from the one holding row `base` on are taken one node at a time: the node's tile n0 is gathered
# as the cache of decoding its path holds it (committed keys, then its ancestor at depth d at key
# base + d), so its sums are those of its decode step, in the same order, and the block's other rows add
# exact neutrals. A node's output is the bits of decoding its path, at the cost of re-reading those few
# tiles once per node.
#
# The prologue (issue 26, `rope=`): q/k-norm, rope and the KV-cache write in this launch, not one before it. A
# program with a visible key norms and rotates its own q rows into a scratch buffer; one whose split reads a new
# key (end > kv_len - q_len) first writes all the block's new K rows (normed, rotated) and V rows of its kv head
# into the cache (a tree's too: a node's key at base + depth may sit in another split than its row base + node).
# Then a CTA barrier, and the loop reads them as before. Rows are taken 16 at a time by `norm_rope_rows`, whose
# per-row sums and per-dim expressions are `_qk_norm_rope_cache_kernel`'s, so the two-launch form's bits, and a
# row's bits do not depend on the rows beside it. Several programs (the row blocks of a split, and the two
# splits a block may straddle) write the same rows with the same bits: a duplicate store, never a different
# value. Programs whose split holds only committed keys do no K work. A prefill chunk keeps the two launches
# (ops.rope_attention).
#
# The cost of a fixed split size (SPLIT = 256; no GPU has timed the choice yet: kernel_speed.py's
# attention rows are the measurement to make). The splits with work are ceil(kv_len / SPLIT) per kv
# head. At 2k context a decode step of Qwen3-8B (8 kv heads) gets 64 programs, half an H100's 132 SMs,
# for an 8 MB read that costs a few µs either way; at 32k it gets 1024. The empty programs of a 40k
# cache (1280 at 2k context) exit after one load. Each split writes its rows' fp32 partials (D floats
# per query row, rows = q_len × GQA group) and the merge reads them back: 2 × rows / SPLIT of the
# bf16 K/V bytes read, 3% for a decode step at GQA 4, 50% for a verify block of 16 (64 rows), most
# of it in L2 (the merge runs right after). SPLIT = 128 would double both the programs at short
# context and that traffic; 512 would halve both. The partials buffer is sized from the capacity:
# rows / SPLIT of one layer's K/V cache (a quarter for 16 × GQA 4), one buffer the layers share in turn.
# A prefill chunk (more than MAX_INVARIANT_Q_LEN queries; shared by plain and speculative decoding, so
# exempt) takes larger splits, a power-of-two multiple of SPLIT, so its partials stay a few MB.
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .rope_cache import norm_rope_rows  # noqa: E402

# Triton's CPU interpreter mis-computes tl.dot on bfloat16 operands (seen with triton 3.9): under
# TRITON_INTERPRET the operands are upcast to float32 first. On a GPU the dots stay in bf16. The same flag
# rounds the outputs to bf16 by hand (`_rounded`: the interpreter truncates where a GPU rounds to nearest).
_UPCAST_DOTS = os.environ.get("TRITON_INTERPRET") == "1"
SPLIT = 256  # keys per split, at absolute positions: fixed once, never chosen per call
MAX_INVARIANT_Q_LEN = 32  # = ops.MAX_KERNEL_Q_LEN: up to this many queries the splits are SPLIT keys
_BLOCK_M = 64  # query rows per program, whatever the query count
_BLOCK_N = 32  # keys per step (16 for 256-wide heads: see _launch_shape)
_MERGE_CHUNK = 8  # split partials the merge takes at once, per query row
_MERGE_TILE = 8192  # fp32 partials a merge program holds at once: rows × chunk × head dims
_TARGET_PROGRAMS = 256  # a prefill chunk's splits × kv heads × row blocks to aim for


@triton.jit
def _visible_keys(len_ptr, q_len, window, WINDOW: tl.constexpr):
    """[lo, kv_len): the keys some query of the launch may see (the window's start for its first query)."""
    kv_len = tl.load(len_ptr).to(tl.int32)
    lo = kv_len * 0
    if WINDOW:  # the first query, at kv_len - q_len, sees keys j > kv_len - q_len - window
        lo = tl.maximum(kv_len - q_len - window + 1, 0)
    return kv_len, lo


@triton.jit
def _tile(q, k, v, ok, m, l, acc, scale, PRECISION: tl.constexpr):
    """One BLOCK_N-key step of the rows' online softmax; `ok` [rows, keys]: which scores count."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
    p = tl.exp(s - m_safe[:, None])  # exactly 0 where masked
    alpha = tl.exp(m - m_safe)  # exactly 1 where the tile added nothing to the row
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l = l * alpha + tl.sum(p, axis=1)
    return m_new, l, acc


@triton.jit
def _rounded(x, dtype: tl.constexpr, BY_HAND: tl.constexpr):
    """x (fp32) rounded to `dtype` to nearest even, as a GPU's conversion and torch round. BY_HAND: under
    Triton's CPU interpreter, whose float32 -> bfloat16 conversion truncates (seen with triton 3.9)."""
    if BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite values: the nearest bf16, ties to even
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)


@triton.jit
def _merge_rows(acc_ptr, m_ptr, l_ptr, o_ptr, sinks_ptr, gate_ptr, rows, kvh, kv_len, first, q_len, group, n_heads,
                n_splits, gate_stride, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                ROWS: tl.constexpr, CHUNK: tl.constexpr, SINKS: tl.constexpr, GATE: tl.constexpr,
                UPCAST: tl.constexpr):
    """The output of query rows `rows` (token, head) of kv head `kvh`: their split partials merged in
    ascending split order, CHUNK at a time, the sink added, divided, and the output gate applied."""
    n_rows = q_len * group
    row_ok = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    l_run = tl.zeros([ROWS], tl.float32)
    acc_run = tl.zeros([ROWS, BLOCK_D], tl.float32)
    # Chunks before the first visible split are skipped: they would leave (m, l, acc) = (-inf, 0, 0).
    last = (kv_len + SPLIT - 1) // SPLIT
    for c in range(first // SPLIT // CHUNK, (last + CHUNK - 1) // CHUNK):
        splits = c * CHUNK + tl.arange(0, CHUNK)
        # the split kernel's condition for writing: its first tile lies before its end
        s_ok = (tl.maximum(splits * SPLIT, first) < tl.minimum((splits + 1) * SPLIT, kv_len)) & (splits < n_splits)
        ok = row_ok[:, None] & s_ok[None, :]
        idx = (kvh * n_splits + splits[None, :]).to(tl.int64) * n_rows + rows[:, None]  # [ROWS, CHUNK]
        # .cg: from L2, never a line an earlier layer's launch left in this SM's L1 (the buffer is shared)
        m = tl.load(m_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + idx[:, :, None] * BLOCK_D + dims[None, None, :], mask=ok[:, :, None], other=0.0,
                      cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)  # exactly 1 where the chunk adds nothing to the row
        w = tl.exp(m - m_safe[:, None])  # exactly 0 for a split the row does not see
        l_run = l_run * alpha + tl.sum(l * w, axis=1)
        acc_run = acc_run * alpha[:, None] + tl.sum(acc * w[:, :, None], axis=1)
        m_run = m_new
    head = kvh * group + rows % group
    denominator = l_run
    if SINKS:  # the sink is one more logit in the denominator: m* = max(m, sink), l += e^(sink - m*)
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        m_final = tl.maximum(m_run, sink)
        alpha = tl.exp(m_run - m_final)
        denominator = l_run * alpha + tl.exp(sink - m_final)
        acc_run = acc_run * alpha[:, None]
    dtype = o_ptr.dtype.element_ty
    out = _rounded(acc_run / tl.where(row_ok, denominator, 1.0)[:, None], dtype, UPCAST)  # (past the last: 0 / 0)
    t = rows // group
    io_ok = row_ok[:, None] & (dims < D)[None, :]
    if GATE:  # out × sigmoid(gate) as torch computes it: the sigmoid in fp32, each result rounded to the dtype
        g = tl.load(gate_ptr + (t.to(tl.int64) * gate_stride + head * D)[:, None] + dims[None, :], mask=io_ok,
                    other=0.0).to(tl.float32)
        sig = _rounded(1.0 / (1.0 + tl.exp(-g)), dtype, UPCAST)
        out = _rounded(out.to(tl.float32) * sig.to(tl.float32), dtype, UPCAST)
    tl.store(o_ptr + ((t * n_heads + head) * D)[:, None] + dims[None, :], out, mask=io_ok)


_PROLOGUE_ROWS = tl.constexpr(16)  # the q/k/v rows the prologue takes at once: a fixed tile, whatever the query count


@triton.jit
def _rope_prologue(qin_ptr, kin_ptr, vin_ptr, qn_ptr, kn_ptr, cs_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t,
                   sk_h, sv_t, sv_h, half, rot, eps, q_len, group, n_heads, kvh, base, base_pos, end,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
                   OFFSET: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """What `qk_norm_rope_cache` does before attention, in the program that reads it (issue 26): the new K rows
    of kv head `kvh` normed, rotated and written into the cache with their V rows (at base_pos + t), when this
    split reads any new key; and this program's q rows normed and rotated into q_ptr (this launch's scratch).
    Then a barrier: the key loop and the q load read what the program's other threads wrote. The other
    programs of the split (row blocks) and the next split write the same K/V rows with the same bits: a
    duplicate, never a different value, so a read sees those bits whoever wrote last."""
    R: tl.constexpr = _PROLOGUE_ROWS
    dims = tl.arange(0, BLOCK_D)
    dtype = q_ptr.dtype.element_ty
    if end > base_pos:  # this split reads new keys (a tree's: any new row, whichever node's position it holds)
        for t0 in range(0, q_len, R):
            tk = t0 + tl.arange(0, R)
            tk_ok = tk < q_len
            pos = tl.load(pos_ptr + tk, mask=tk_ok, other=0)
            row = base + (base_pos + tk).to(tl.int64) * D
            norm_rope_rows(kin_ptr, tk * sk_t + kvh * sk_h, k_ptr, row, pos, tk_ok, kn_ptr, cs_ptr, half, rot, D, eps,
                           HAS_NORM, OFFSET, BLOCK_H, BLOCK_P, BLOCK_D, dtype)
            ok = tk_ok[:, None] & (dims < D)[None, :]
            vals = tl.load(vin_ptr + (tk * sv_t + kvh * sv_h)[:, None] + dims[None, :], mask=ok)
            tl.store(v_ptr + row[:, None] + dims[None, :], vals.to(v_ptr.dtype.element_ty), mask=ok)
    first_row = tl.program_id(0) * BLOCK_M
    for r0 in range(0, tl.minimum(BLOCK_M, q_len * group - first_row), R):
        rows = first_row + r0 + tl.arange(0, R)  # row r = t * group + g, as the key loop's
        t = rows // group
        head = kvh * group + rows % group
        r_ok = t < q_len
        pos = tl.load(pos_ptr + t, mask=r_ok, other=0)
        norm_rope_rows(qin_ptr, t * sq_t + head * sq_h, q_ptr, (t * n_heads + head) * D, pos, r_ok, qn_ptr, cs_ptr,
                       half, rot, D, eps, HAS_NORM, OFFSET, BLOCK_H, BLOCK_P, BLOCK_D, dtype)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["q_len"])  # q_len varies (prefill tails): no recompile per value
def _attn_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, m_ptr, l_ptr, cnt_ptr, o_ptr, sinks_ptr, gate_ptr,
                 tree_ptr, pos_ptr, q_len, group, n_heads, capacity, window, scale, n_splits, gate_stride,
                 tree_stride, qin_ptr, kin_ptr, vin_ptr, qn_ptr, kn_ptr, cs_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                 half, rot, eps, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, MERGE: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                 SINKS: tl.constexpr, GATE: tl.constexpr, TREE: tl.constexpr, ROPE: tl.constexpr,
                 HAS_NORM: tl.constexpr, OFFSET: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    split = tl.program_id(1)
    kvh = tl.program_id(2)
    kv_len, lo = _visible_keys(len_ptr, q_len, window, WINDOW)
    first = lo // BLOCK_N * BLOCK_N  # leading tiles nobody sees: skipped
    start = tl.maximum(split * SPLIT, first)
    end = tl.minimum((split + 1) * SPLIT, kv_len)
    if start < end:  # a split with no visible key writes nothing: the merge counts it out the same way
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = t * group + g
        t = rows // group
        g = rows % group
        n_rows = q_len * group
        row_ok = rows < n_rows
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        base_pos = kv_len - q_len  # the first new token's cache row
        base = kvh.to(tl.int64) * capacity * D
        if ROPE:
            _rope_prologue(qin_ptr, kin_ptr, vin_ptr, qn_ptr, kn_ptr, cs_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, sq_t,
                           sq_h, sk_t, sk_h, sv_t, sv_h, half, rot, eps, q_len, group, n_heads, kvh, base, base_pos,
                           end, D, BLOCK_M, BLOCK_D, HAS_NORM, OFFSET, BLOCK_H, BLOCK_P)
        q = tl.load(q_ptr + ((t * n_heads + kvh * group + g) * D)[:, None] + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if TREE:  # node t at position base + depth(t): its own
            q_pos = tl.load(pos_ptr + t, mask=row_ok, other=0).to(tl.int32)
            shared_end = tl.minimum(end, base_pos // BLOCK_N * BLOCK_N)  # the tiles of committed keys only
        else:
            q_pos = base_pos + t
            shared_end = end
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, shared_end, BLOCK_N):  # keys every row of the block reads from the same rows
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            kv_off = base + keys[:, None] * D + dims[None, :]
            k = tl.load(k_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(v_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            ok = key_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                ok = ok & (keys[None, :] <= q_pos[:, None])
            if WINDOW:
                ok = ok & (q_pos[:, None] - keys[None, :] < window)
            m, l, acc = _tile(q, k, v, ok, m, l, acc, scale, PRECISION)
        if TREE:
            # The tiles that hold new rows: each node's own, one node at a time. Its tile n0 holds what the
            # cache of decoding its path holds at keys n0..: the committed keys, then its ancestors in
            # depth order (the one at depth d at key base + d, read from the cache row base + its node
            # index), then nothing. So the same sums in the same order: a node's output is the bits of
            # decoding its path. The other rows of the block add exactly nothing (weight 0, rescale 1).
            nodes = tl.arange(0, TREE)
            node_ok = nodes < q_len
            depth = tl.load(pos_ptr + nodes, mask=node_ok, other=0).to(tl.int32) - base_pos
            t_first = tl.program_id(0) * BLOCK_M // group
            t_last = tl.minimum(((tl.program_id(0) + 1) * BLOCK_M + group - 1) // group, q_len)
            for node in range(t_first, t_last):
                ancestor = tl.load(tree_ptr + node * tree_stride + base_pos + nodes, mask=node_ok, other=0) != 0
                mine = row_ok & (t == node)
                for n0 in range(tl.maximum(start, shared_end), end, BLOCK_N):
                    keys = n0 + tl.arange(0, BLOCK_N)
                    at = ancestor[None, :] & (depth[None, :] == (keys - base_pos)[:, None])  # [keys, nodes]
                    found = tl.max(at.to(tl.int32), axis=1) > 0
                    row = tl.where(keys < base_pos, keys, base_pos + tl.sum(tl.where(at, nodes[None, :], 0), axis=1))
                    key_ok = (keys < end) & ((keys < base_pos) | found)
                    kv_off = base + row[:, None] * D + dims[None, :]
                    k = tl.load(k_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
                    v = tl.load(v_ptr + kv_off, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
                    if UPCAST:
                        k = k.to(tl.float32)
                        v = v.to(tl.float32)
                    ok = key_ok[None, :] & mine[:, None] & (keys[None, :] <= q_pos[:, None])
                    if WINDOW:
                        ok = ok & (q_pos[:, None] - keys[None, :] < window)
                    m, l, acc = _tile(q, k, v, ok, m, l, acc, scale, PRECISION)
        out = (kvh * n_splits + split).to(tl.int64) * n_rows + rows  # int64: long caches' partials
        tl.store(acc_ptr + out[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, l, mask=row_ok)
        if MERGE:
            # The split to finish last merges (one launch, not two). Its ticket, drawn after this program's
            # partials are stored (the barrier, then a release), comes with the others' stores (acquire).
            tl.debug_barrier()
            counter = cnt_ptr + kvh * tl.num_programs(0) + tl.program_id(0)
            writers = (kv_len + SPLIT - 1) // SPLIT - first // SPLIT  # the splits with a visible key
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == writers - 1:
                tl.store(counter, 0)  # zero again for the next launch (a CUDA graph replays this one)
                for r0 in range(0, tl.minimum(BLOCK_M, n_rows - tl.program_id(0) * BLOCK_M), ROWS):
                    _merge_rows(acc_ptr, m_ptr, l_ptr, o_ptr, sinks_ptr, gate_ptr,
                                tl.program_id(0) * BLOCK_M + r0 + tl.arange(0, ROWS), kvh, kv_len, first, q_len,
                                group, n_heads, n_splits, gate_stride, D, BLOCK_D, SPLIT, ROWS, CHUNK, SINKS, GATE,
                                UPCAST)


@triton.jit(do_not_specialize=["q_len"])
def _attn_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, len_ptr, sinks_ptr, gate_ptr, q_len, group, n_heads, n_splits,
                       window, gate_stride, WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                       SINKS: tl.constexpr, GATE: tl.constexpr, UPCAST: tl.constexpr):
    """The two-launch form's merge (`attention(..., one_launch=False)`): what the last split does, as its
    own launch. Kept as the reference the one-launch form is checked against, bit for bit."""
    kv_len, lo = _visible_keys(len_ptr, q_len, window, WINDOW)
    _merge_rows(acc_ptr, m_ptr, l_ptr, o_ptr, sinks_ptr, gate_ptr, tl.program_id(0) * ROWS + tl.arange(0, ROWS),
                tl.program_id(1), kv_len, lo // BLOCK_N * BLOCK_N, q_len, group, n_heads, n_splits, gate_stride,
                D, BLOCK_D, SPLIT, ROWS, CHUNK, SINKS, GATE, UPCAST)


def _launch_shape(block_d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(keys per step, pipeline stages) whose K/V tiles fit the 99 KB of shared memory a block gets on
    sm_86/sm_89/sm_120 (RTX 30xx/40xx/50xx) as well as the larger A100/H100 budgets: three stages of 32
    keys of 128 bf16 dims use 75 KB, but 256-wide heads (Qwen3.5) or float32 tiles would need 105-140 KB
    (tests/kernels/compile_kernels.py compiles every launch for each target and checks). Decode-shaped
    attention is bound by reading the cache: a shallower pipeline costs little. Neither depends on the
    query count: one configuration per head size and dtype."""
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    stages = 3 if row_bytes <= 256 else 2 if row_bytes <= 512 else 1
    return (16 if block_d >= 256 else _BLOCK_N), stages


def split_size(q_len: int, capacity: int, kv_heads: int, group: int) -> int:
    """Keys per split: SPLIT for decode, verify and draft (up to MAX_INVARIANT_Q_LEN queries: the
    batch-invariant path); a prefill chunk takes a power-of-two multiple of it, so that its splits ×
    kv heads × row blocks stay near _TARGET_PROGRAMS and its partials a few MB."""
    if q_len <= MAX_INVARIANT_Q_LEN:
        return SPLIT
    want = max(1, _TARGET_PROGRAMS // (kv_heads * triton.cdiv(q_len * group, _BLOCK_M)))
    return max(SPLIT, triton.next_power_of_2(triton.cdiv(capacity, want)))


_COUNTERS: dict = {}  # (device, stream) -> the merge tickets' int32 counters, zero between launches


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 ticket counters, kept for every later launch on this device and stream (each launch
    leaves them zero again): allocated once, not per step (a memset would be one more launch), and the
    same memory in every replay of a captured graph. Grown (to a power of two) only when a launch needs more."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    have = _COUNTERS.get(key)
    if have is None or have.numel() < n:
        have = _COUNTERS[key] = torch.zeros(max(1024, triton.next_power_of_2(n)), dtype=torch.int32, device=device)
    return have


@dataclass(frozen=True)
class Rope:
    """The attention prologue's inputs (issue 26): what `rope_cache.qk_norm_rope_cache` takes besides q and the
    caches. k, v: [Tq, Hkv, D], the new tokens' (rows may be strided); q_norm, k_norm: [D] or None; cos_sin: the
    rope table; positions: [Tq] int64 (a tree's: anchor + depth)."""
    k: torch.Tensor
    v: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    eps: float
    cos_sin: torch.Tensor
    positions: torch.Tensor
    offset: bool = False


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q, k_cache, v_cache, kv_len, *, causal: bool, scale: float, sliding_window: int | None = None,
              sinks: torch.Tensor | None = None, gate: torch.Tensor | None = None,
              tree: tuple[torch.Tensor, torch.Tensor] | None = None, split: int | None = None,
              one_launch: bool = True, rope: Rope | None = None):
    """Triton: the contract of `attention_ref` (caches contiguous, as the engine allocates them; kv_len a
    device tensor), in one launch: the split to finish last merges. `split` overrides the keys per split
    (a multiple of the kernel's key tile; tests sweep it); one_launch=False merges in a second launch
    (the reference the one-launch form is checked against).

    gate: [Tq, Hq, D] (rows may be strided): the output times sigmoid(gate), in the merge.
    tree: (mask [Tq, capacity] bool, positions [Tq] int64), a tree verify's (Decoder.forward(tree=...)): query
    t is node t, at position positions[t] = kv_len - Tq + depth(t), whose K/V are at cache row kv_len - Tq + t;
    it sees every committed key (rows before kv_len - Tq) and the new rows j with mask[t, kv_len - Tq + j] (its
    ancestors and itself; the mask's other columns are not read), within the window by position. Its output is
    the bits of decoding its path (see the kernel), which `causal` and the mask of `attention_ref` describe.

    rope: q as it leaves the projection, normed and rotated in this launch, and the new K/V rows (rope.k, rope.v)
    written into the caches at kv_len - Tq + t first (`_rope_prologue`): `qk_norm_rope_cache(q, rope..., caches)`
    then `attention`, in one launch and with the same bits (output and caches). A tree's positions are its
    (tree[1] is rope.positions), its K/V rows kv_len - Tq + t as there."""
    if rope is None:
        q = q.contiguous()
    else:
        q, raw = torch.empty(q.shape, dtype=q.dtype, device=q.device), _rows(q)  # q: the rotated rows, scratch
        k_in, v_in = _rows(rope.k), _rows(rope.v)
        rot = rope.cos_sin.shape[1]
        assert rope.cos_sin.is_contiguous() and rot % 2 == 0 and rot <= q.shape[2], (rope.cos_sin.shape, q.shape)
        assert k_in.shape == v_in.shape == (q.shape[0], k_cache.shape[0], q.shape[2]), (k_in.shape, v_in.shape)
        assert tree is None or tree[1] is rope.positions
    tq, hq, d = q.shape
    hkv, capacity, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert hq % hkv == 0 and k_cache.shape[2] == d, (q.shape, k_cache.shape)
    group = hq // hkv
    n_rows = tq * group
    block_d = max(16, triton.next_power_of_2(d))
    block_n, stages = _launch_shape(block_d, q.dtype)
    split = split or (SPLIT if tree is not None else split_size(tq, capacity, hkv, group))  # a tree: invariant
    assert split % block_n == 0, (split, block_n)
    n_splits = triton.cdiv(capacity, split)
    acc = torch.empty((hkv * n_splits * n_rows, block_d), dtype=torch.float32, device=q.device)
    m = torch.empty((hkv * n_splits * n_rows,), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty_like(q)
    if gate is not None:
        assert gate.shape == q.shape and gate.stride(2) == 1 and gate.stride(1) == d, (gate.shape, gate.stride())
    if tree is not None:
        mask, positions = tree
        assert mask.shape == (tq, capacity) and mask.stride(1) == 1 and positions.shape == (tq,), (mask.shape, tq)
        mask = mask.view(torch.uint8)
        causal = True
    window = sliding_window or 0
    row_blocks = triton.cdiv(n_rows, _BLOCK_M)
    merge_rows = max(1, _MERGE_TILE // (_MERGE_CHUNK * block_d))
    common = dict(WINDOW=sliding_window is not None, D=d, BLOCK_D=block_d, SPLIT=split, ROWS=merge_rows,
                  CHUNK=_MERGE_CHUNK, SINKS=sinks is not None, GATE=gate is not None)
    _attn_kernel[(row_blocks, n_splits, hkv)](
        q, k_cache, v_cache, kv_len, acc, m, l, _counters(q.device, row_blocks * hkv), out,
        sinks if sinks is not None else m, gate if gate is not None else q,
        mask if tree is not None else q,
        positions if tree is not None else rope.positions if rope is not None else kv_len,
        tq, group, hq, capacity, window, scale, n_splits, 0 if gate is None else gate.stride(0),
        0 if tree is None else mask.stride(0),
        *((q, q, q, q, q, q) if rope is None else
          (raw, k_in, v_in, *((rope.q_norm, rope.k_norm) if rope.q_norm is not None else (q, q)), rope.cos_sin)),
        *((0,) * 6 if rope is None else (raw.stride(0), raw.stride(1), k_in.stride(0), k_in.stride(1), v_in.stride(0),
                                         v_in.stride(1))),
        0 if rope is None else rot // 2, 0 if rope is None else rot, 0.0 if rope is None else rope.eps,
        ROPE=rope is not None, HAS_NORM=rope is not None and rope.q_norm is not None,
        OFFSET=rope is not None and rope.offset, BLOCK_H=1 if rope is None else triton.next_power_of_2(rot // 2),
        BLOCK_P=1 if rope is None else max(1, triton.next_power_of_2(d - rot)),
        CAUSAL=causal, BLOCK_M=_BLOCK_M, BLOCK_N=block_n, UPCAST=_UPCAST_DOTS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; bf16 uses tensor cores
        MERGE=one_launch, TREE=0 if tree is None else max(16, triton.next_power_of_2(tq)), **common,
        num_warps=4 if _BLOCK_M * block_d <= 64 * 128 else 8, num_stages=stages)
    if not one_launch:
        _attn_merge_kernel[(triton.cdiv(n_rows, merge_rows), hkv)](
            acc, m, l, out, kv_len, sinks if sinks is not None else m, gate if gate is not None else q, tq, group,
            hq, n_splits, window, 0 if gate is None else gate.stride(0), BLOCK_N=block_n, UPCAST=_UPCAST_DOTS, **common)
    return out
