"""Accept/bonus for one speculative iteration, and the sampler it is built on.

Given the target's logits at the B block positions and the block `[bonus, d1 .. d(B-1)]`, pick the
target's token y_i at every position, accept drafts while `d(i+1) == y(i)`, and advance the cache
length by `a + 1`. With a point-mass draft this is exactly lossless at any temperature (DESIGN §1).
Emitted tokens are `y[: a + 1]`: the accepted drafts equal the target's own choices, and `y[a]`
is the new bonus.

Sampling is Gumbel-max with counter-based noise: the noise for the token sampled from logits at
sequence position p is a hash of (seed, p, vocab id). It depends on the position, never on the
iteration, so a seeded speculative run emits exactly the tokens a seeded plain run does (the
target distributions being equal), and the kernel and this reference draw the same sample.
Filters: temperature, then top-k, then top-p on the renormalised top-k distribution, then min-p.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
U_MAX = 1.0 - 2.0**-24  # the largest float32 below 1


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def uniform_noise(seed: int, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32, [len(rows), vocab]: a pure function of (seed, row, vocab id).

    Two keys per row keep rows from colliding as whole permutations of each other.
    """
    key_a = fmix32((rows & M32) ^ (seed & M32))[:, None]
    key_b = fmix32(key_a ^ 0x5BD1E995)
    v = torch.arange(vocab, device=rows.device, dtype=torch.int64)[None, :]
    h = fmix32(fmix32((v + key_a) & M32) ^ key_b)
    # float32(2**24 - 1) + 0.5 rounds up to 2**24: u would be exactly 1 and its Gumbel noise +inf
    # (one token in ~16M), which wins whatever its probability. Cap u below 1.
    return (((h >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=U_MAX)


def filtered_scores(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """logits / T with the tokens removed by top-k, top-p and min-p set to -inf (float32)."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(scores.softmax(-1), dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample_ref(
    logits: torch.Tensor,
    rows: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """One token per row of `logits` [N, V]; `rows` [N] are the sequence positions of the logits.

    temperature == 0 is greedy (first maximal index, as torch.argmax and transformers do).
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    scores = filtered_scores(logits, temperature, top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, rows, logits.shape[-1])))
    return (scores + gumbel).argmax(-1)


def accept_ref(
    logits: torch.Tensor,
    block_ids: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. logits: [B, V] at positions cache_len .. cache_len+B-1; block_ids: [B].

    Returns (y [B], accepted a: 0-d int64) and advances `cache_len` (0-d int64) by a + 1 in place.
    """
    rows = cache_len + torch.arange(logits.shape[0], device=logits.device)
    y = sample_ref(
        logits, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    accepted = (block_ids[1:] == y[:-1]).cumprod(0).sum()
    cache_len.add_(accepted + 1)
    return y, accepted


# ---- Triton ---------------------------------------------------------------------------------
# One program per row. Greedy: a running first-index argmax over vocabulary chunks. Sampling:
# passes over the row's chunks, never materialising a softmax: the max; for top-k, a bisection on
# the order-preserving integer image of the float scores finds the k-th largest value exactly
# (32 passes); for top-p, a second bisection finds the smallest score whose strictly-higher mass
# is below top_p; min-p is a closed-form threshold (exp(s - max) >= min_p); then the Gumbel-max
# pass with the same hashed noise as the reference. Seeds may be ints or device tensors.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _order_key(s):
    """int32 image of float32 that preserves order."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _scores(row_ptr, cols, vocab, temperature):
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return x / temperature


@triton.jit
def _sample_kernel(logits_ptr, stride, rows_ptr, seed_ptr, out_ptr, vocab, temperature, top_k, top_p, min_p,
                   GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row_ptr = logits_ptr + pid.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK)
    if GREEDY:
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.full((), 0, tl.int64)
        for c0 in range(0, vocab, BLOCK):
            x = tl.load(row_ptr + c0 + offs, mask=c0 + offs < vocab, other=float("-inf")).to(tl.float32)
            cm = tl.max(x, axis=0)
            ci = tl.min(tl.where(x == cm, c0 + offs, vocab), axis=0).to(tl.int64)  # first maximal index
            take = cm > best
            best_i = tl.where(take, ci, best_i)
            best = tl.where(take, cm, best)
        tl.store(out_ptr + pid, best_i)
        return
    m = tl.full((), float("-inf"), tl.float32)
    for c0 in range(0, vocab, BLOCK):
        m = tl.maximum(m, tl.max(_scores(row_ptr, c0 + offs, vocab, temperature), axis=0))
    lo_k = tl.full((), -2147483648, tl.int64)  # keep tokens whose key >= lo_k
    if TOP_K:
        lo = tl.full((), -2147483648, tl.int64)
        hi = tl.full((), 2147483647, tl.int64)
        for _ in range(33):  # largest T with count(key >= T) >= k: the k-th largest score
            mid = lo + (hi - lo + 1) // 2  # non-negative division: floor on every backend
            count = tl.full((), 0, tl.int64)
            for c0 in range(0, vocab, BLOCK):
                cols = c0 + offs
                key = _order_key(_scores(row_ptr, cols, vocab, temperature)).to(tl.int64)
                count += tl.sum(((key >= mid) & (cols < vocab)).to(tl.int64), axis=0)
            ok = count >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        lo_k = lo
    if TOP_P:
        z = tl.full((), 0.0, tl.float32)
        for c0 in range(0, vocab, BLOCK):
            cols = c0 + offs
            s = _scores(row_ptr, cols, vocab, temperature)
            keep = (_order_key(s).to(tl.int64) >= lo_k) & (cols < vocab)
            z += tl.sum(tl.where(keep, tl.exp(s - m), 0.0), axis=0)
        lo = lo_k
        hi = tl.full((), 2147483647, tl.int64)
        for _ in range(33):  # smallest X with mass(key > X) < top_p
            mid = lo + (hi - lo) // 2
            mass = tl.full((), 0.0, tl.float32)
            for c0 in range(0, vocab, BLOCK):
                cols = c0 + offs
                s = _scores(row_ptr, cols, vocab, temperature)
                key = _order_key(s).to(tl.int64)
                mass += tl.sum(tl.where((key > mid) & (key >= lo_k) & (cols < vocab), tl.exp(s - m), 0.0), axis=0)
            below = mass / z < top_p
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid + 1)
        lo_k = lo
    seed = tl.load(seed_ptr).to(tl.uint32)
    row = tl.load(rows_ptr + pid).to(tl.uint32)
    key_a = _fmix32(row ^ seed)
    key_b = _fmix32(key_a ^ 0x5BD1E995)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + offs
        s = _scores(row_ptr, cols, vocab, temperature)
        keep = (_order_key(s).to(tl.int64) >= lo_k) & (cols < vocab)
        if MIN_P:
            keep = keep & (tl.exp(s - m) >= min_p)
        h = _fmix32(_fmix32(cols.to(tl.uint32) + key_a) ^ key_b)
        u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994039535522)  # U_MAX
        g = tl.where(keep, s - tl.log(-tl.log(u)), float("-inf"))
        cm = tl.max(g, axis=0)
        ci = tl.min(tl.where(g == cm, cols, vocab), axis=0).to(tl.int64)
        take = cm > best
        best_i = tl.where(take, ci, best_i)
        best = tl.where(take, cm, best)
    tl.store(out_ptr + pid, best_i)


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return (seed & M32).reshape(1)
    return torch.full((1,), seed & M32, dtype=torch.int64, device=device)


def sample(logits: torch.Tensor, rows: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, seed=0) -> torch.Tensor:
    """Triton: same contract as `sample_ref`."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    greedy = temperature == 0.0
    _sample_kernel[(n,)](
        logits, logits.stride(0), rows, _seed_tensor(seed, logits.device), out, vocab,
        1.0 if greedy else float(temperature), top_k, top_p, min_p, GREEDY=greedy,
        TOP_K=0 < top_k < vocab, TOP_P=top_p < 1.0, MIN_P=min_p > 0.0,
        BLOCK=min(4096, triton.next_power_of_2(vocab)))
    return out


@triton.jit
def _accept_kernel(block_ptr, y_ptr, len_ptr, acc_ptr, b, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < b - 1
    draft = tl.load(block_ptr + 1 + i, mask=ok, other=-1)
    target = tl.load(y_ptr + i, mask=ok, other=-2)
    miss = tl.where(ok & (draft != target), i, b - 1)
    accepted = tl.min(miss, axis=0).to(tl.int64)  # drafts accepted: up to the first mismatch
    tl.store(acc_ptr, accepted)
    tl.store(len_ptr, tl.load(len_ptr) + accepted + 1)


def accept(logits: torch.Tensor, block_ids: torch.Tensor, cache_len: torch.Tensor, *, temperature: float,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: same contract as `accept_ref`, with no host synchronisation."""
    b = logits.shape[0]
    rows = cache_len + torch.arange(b, device=logits.device)
    y = sample(logits, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    accepted = torch.empty((), dtype=torch.int64, device=logits.device)
    _accept_kernel[(1,)](block_ids, y, cache_len, accepted, b, BLOCK=max(2, triton.next_power_of_2(b)))
    return y, accepted
