"""Accept/bonus for one speculative iteration, and the sampler it is built on.

Given the target's logits at the B block positions and the block `[bonus, d1 .. d(B-1)]`, pick the
target's token y_i at every position and count the drafts accepted while `d(i+1) == y(i)`. With a
point-mass draft this is exactly lossless at any temperature (DESIGN §1). Emitted tokens are
`y[: a + 1]`: the accepted drafts equal the target's own choices, and `y[a]` is the new bonus.
Committing the a + 1 tokens is the model family's job (its `commit`), not the sampler's.

Sampling is Gumbel-max with counter-based noise: the noise for the token sampled from logits at
sequence position p is a hash of (seed, p, vocab id). It depends on the position, never on the
iteration, so a seeded speculative run emits exactly the tokens a seeded plain run does (the
target distributions being equal), and the kernel and this reference draw the same sample.
Filters: temperature, then top-k, then top-p on the renormalised top-k distribution, then min-p.

The values (temperature, top_k, top_p, min_p, seed) may be numbers or 0-d device tensors: the engine
keeps them on the device, so that one captured CUDA graph serves every value; only the `Mode` (which
filters are on) changes which code runs, and keys a graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import Mode

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

    Two keys per row keep rows from colliding as whole permutations of each other. The top 24-bit
    value, 2^24 - 1 + 0.5, rounds to 2^24 in float32: u would be exactly 1, its Gumbel noise +inf
    (and a filtered token's score NaN, which argmax picks), so u is capped at U_MAX.
    """
    key_a = fmix32((rows & M32) ^ (seed & M32))[:, None]
    key_b = fmix32(key_a ^ 0x5BD1E995)
    v = torch.arange(vocab, device=rows.device, dtype=torch.int64)[None, :]
    h = fmix32(fmix32((v + key_a) & M32) ^ key_b)
    return (((h >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=U_MAX)


def _mode(mode: Mode | None, temperature, top_k, top_p, min_p) -> Mode:
    if mode is not None:
        return mode
    assert not any(isinstance(v, torch.Tensor) for v in (temperature, top_k, top_p, min_p)), \
        "device-tensor sampling parameters need their Mode"
    return Mode.of(temperature, top_k, top_p, min_p)


def filtered_scores(logits: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0,
                    mode: Mode | None = None) -> torch.Tensor:
    """logits / T with the tokens removed by top-k, top-p and min-p set to -inf (float32).

    No value is read back to the host: the k-th score is gathered at a device index (ties with it
    are kept), so this runs inside a captured step with tensor parameters."""
    mode = _mode(mode, temperature, top_k, top_p, min_p)
    scores = logits.float() / temperature
    if mode.top_k:
        ranked = scores.sort(-1, descending=True).values
        k = torch.as_tensor(top_k, device=scores.device).clamp(1, scores.shape[-1])
        kth = ranked.gather(-1, (k - 1).expand(*scores.shape[:-1], 1))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if mode.top_p:
        probs, order = torch.sort(scores.softmax(-1), dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    if mode.min_p:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample_ref(logits: torch.Tensor, rows: torch.Tensor, *, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0,
               mode: Mode | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V]; `rows` [N] are the sequence positions of the logits.

    Greedy (temperature 0) takes the first maximal index, as torch.argmax and transformers do.
    """
    mode = _mode(mode, temperature, top_k, top_p, min_p)
    if mode.greedy:
        return logits.argmax(-1)
    scores = filtered_scores(logits, temperature, top_k, top_p, min_p, mode)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, rows, logits.shape[-1])))
    return (scores + gumbel).argmax(-1)


def accept_ref(logits: torch.Tensor, block_ids: torch.Tensor, cache_len: torch.Tensor, *, temperature, top_k=0,
               top_p=1.0, min_p=0.0, seed=0, mode: Mode | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. logits: [B, V] at positions cache_len .. cache_len+B-1; block_ids: [B].

    Returns (y [B], accepted a: 0-d int64); `cache_len` is only read.
    """
    rows = cache_len + torch.arange(logits.shape[0], device=logits.device)
    y = sample_ref(logits, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                   mode=mode)
    accepted = (block_ids[1:] == y[:-1]).cumprod(0).sum()
    return y, accepted


@dataclass(frozen=True)
class Verdict:
    """What an iteration's accept step hands on, laid out for the engine: `packed` [1 + 2b] int64 is
    [a, y_0 .. y_(b-1), block_0 .. block_(b-1)] (the iteration's one readback), `y` and `accepted` are
    views of it; `count` (0-d) = a + 1 (the rows every cache commits) and `bonus` [1] = y_a (the next
    iteration's first token)."""

    packed: torch.Tensor
    count: torch.Tensor
    bonus: torch.Tensor

    @property
    def y(self) -> torch.Tensor:
        return self.packed[1:1 + self.block_size]

    @property
    def accepted(self) -> torch.Tensor:
        return self.packed[0]

    @property
    def block_size(self) -> int:
        return (self.packed.shape[0] - 1) // 2


def verdict_ref(logits: torch.Tensor, block_ids: torch.Tensor, cache_len: torch.Tensor, **params) -> Verdict:
    """Reference: `accept_ref`, packed as a `Verdict`."""
    y, accepted = accept_ref(logits, block_ids, cache_len, **params)
    return Verdict(torch.cat((accepted.view(1), y, block_ids)), accepted + 1, y.gather(0, accepted.view(1)))


# ---- Triton ---------------------------------------------------------------------------------
# Two launches, so that one row's vocabulary is spread over many programs (a verify has only B rows,
# and one program walking 152k logits dozens of times is the slow way to sample).
#  1. `_chunk_kernel`, grid (rows, vocabulary chunks of CHUNK): greedy → the chunk's max and its
#     first index; sampling without filters → the chunk's Gumbel-max winner; with filters → the
#     chunk's CANDIDATES highest scores (the order-preserving int32 image of the float score,
#     packed with the token index into an int64 and picked by a bitonic top-k), the key of its
#     lowest candidate, and its max and Σ exp(s - max) for top-p's normaliser.
#  2. `_select_kernel`, one program per row: greedy and unfiltered sampling reduce the chunk
#     winners (ties → first index). Filtered: with `low` the highest "lowest candidate" key, every
#     token whose key is above `low` is a candidate, so a threshold above `low` is found exactly
#     among the candidates. Both thresholds are "the smallest key X whose strictly higher tokens
#     weigh less than a budget": top-k counts them (budget k: X is the k-th largest score, ties
#     kept as the reference keeps them), top-p sums exp(s - max) (budget top_p · z: the reference's
#     "mass ranked before" rule); a PROBES-ary search on the int32 keys pins X in 16 steps.
#     min-p is a closed form, exp(s - max) >= min_p. When the filters drop every token at or below
#     `low` (the usual case: kept sets are small next to 64 per chunk) the sample is the Gumbel-max
#     over the candidates. Otherwise (e.g. a flat distribution under top-p near 1, or top-k beyond
#     the candidates) the program runs the same searches over its whole row (8-ary, 11 passes per
#     threshold): slow but exact, and rare.
# Agreement with `sample_ref` is exact up to ties: scores tied at a top-p boundary (all kept here,
# the reference's sort keeps an arbitrary subset) and probability sums within rounding of top_p.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

CHUNK = 8192  # vocabulary entries per program of the first pass (a power of two)
CANDIDATES = 64  # highest scores each chunk hands to the second pass (a power of two, <= CHUNK)
PROBES = 4  # thresholds per step of a search among the candidates (8 per pass in the fallback)


def _search_steps(probes: int) -> int:
    """Steps of a `probes`-ary search to pin one int32 key: each leaves at most ceil(d/probes) - 1."""
    d, steps = 2**32 - 1, 0
    while d:
        d, steps = -(-d // probes) - 1, steps + 1
    return steps


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _order_key(s):
    """int32 image of float32 that preserves order (an involution on the bits: see _key_score)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_score(key):
    bits = key.to(tl.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scores(row_ptr, cols, vocab, temperature):
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    return tl.div_rn(x, temperature)  # IEEE division, as torch's (a plain `/` is approximate on GPUs)


@triton.jit
def _row_keys(rows_ptr, seed_ptr, pid, ROW_OFFSET: tl.constexpr):
    """The row's two noise keys (see `uniform_noise`); the row is the logits' sequence position,
    given per row, or (ROW_OFFSET) as the first row's position: accept reads the cache length."""
    if ROW_OFFSET:
        row = tl.load(rows_ptr) + pid
    else:
        row = tl.load(rows_ptr + pid)
    key_a = _fmix32(row.to(tl.uint32) ^ tl.load(seed_ptr).to(tl.uint32))
    return key_a, _fmix32(key_a ^ 0x5BD1E995)


@triton.jit
def _gumbel(s, cols, key_a, key_b):
    """s + Gumbel noise, computed as the reference does: s + (-log(-log(u)))."""
    h = _fmix32(_fmix32(cols.to(tl.uint32) + key_a) ^ key_b)
    u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994039535522)  # U_MAX
    return s - tl.log(-tl.log(u))


@triton.jit
def _chunk_kernel(logits_ptr, stride, rows_ptr, seed_ptr, vocab, values_ptr, best_ptr, index_ptr, cand_ptr,
                  low_ptr, sum_ptr, MODE: tl.constexpr, ROW_OFFSET: tl.constexpr, NEED_SUM: tl.constexpr,
                  CHUNK: tl.constexpr, KC: tl.constexpr):
    pid = tl.program_id(0)
    slot = pid * tl.num_programs(1) + tl.program_id(1)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    ok = cols < vocab
    row_ptr = logits_ptr + pid.to(tl.int64) * stride
    if MODE == 0:  # greedy
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        best = tl.max(x, axis=0)
        tl.store(best_ptr + slot, best)
        tl.store(index_ptr + slot, tl.min(tl.where(x == best, cols, vocab), axis=0))  # first maximal index
    elif MODE == 1:  # sampling without filters
        temperature = tl.load(values_ptr)
        key_a, key_b = _row_keys(rows_ptr, seed_ptr, pid, ROW_OFFSET)
        g = tl.where(ok, _gumbel(_scores(row_ptr, cols, vocab, temperature), cols, key_a, key_b), float("-inf"))
        best = tl.max(g, axis=0)
        tl.store(best_ptr + slot, best)
        tl.store(index_ptr + slot, tl.min(tl.where(g == best, cols, vocab), axis=0))
    else:  # filtered: the chunk's KC highest scores, as key << 32 | index
        s = _scores(row_ptr, cols, vocab, tl.load(values_ptr))
        key = tl.where(ok, _order_key(s), -2147483648)  # no float maps to INT_MIN: it marks padding
        packed = (key.to(tl.int64) << 32) | cols.to(tl.int64)
        if KC < CHUNK:
            top = tl.topk(packed, KC)
            low = tl.min(top, axis=0) >> 32  # INT_MIN: the chunk has no more than KC tokens
        else:
            top = packed
            low = tl.full((), -2147483648, tl.int64)
        tl.store(cand_ptr + slot.to(tl.int64) * KC + tl.arange(0, KC), top)
        tl.store(low_ptr + slot, low)
        if NEED_SUM:
            m = tl.max(s, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)
            tl.store(best_ptr + slot, m)
            tl.store(sum_ptr + slot, tl.sum(tl.where(ok, tl.exp(s - m), 0.0), axis=0))


@triton.jit
def _smallest_above(key, weight, lo, budget, PROBES: tl.constexpr, STEPS: tl.constexpr):
    """The smallest X >= lo with Σ weight[key > X] < budget, over keys held in registers.

    Top-k is X = the k-th largest key (weights 1, budget k); top-p is the smallest X whose strictly
    higher mass is below top_p · z. A PROBES-ary search: each step evaluates PROBES thresholds at
    once and keeps 1/PROBES of the range; STEPS of them pin any int32 key."""
    hi = tl.full((), 2147483647, tl.int64)  # nothing lies above INT_MAX: the answer is <= hi
    probes = tl.arange(0, PROBES)
    for _ in range(STEPS):
        mids = lo + ((hi - lo) * probes) // PROBES  # non-negative division: floor on every backend
        above = tl.sum(tl.where(key[:, None] > mids[None, :], weight[:, None], 0.0), axis=0)
        below = above < budget
        hi = tl.min(tl.where(below, mids, hi), axis=0)
        lo = tl.max(tl.where(below, lo, mids + 1), axis=0)
    return hi


@triton.jit
def _row_smallest_above(row_ptr, vocab, temperature, m, lo, budget, MASS: tl.constexpr, PROBES: tl.constexpr,
                        STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """`_smallest_above` over a whole row in memory (the fallback): weights 1 (count) or, with MASS,
    exp(s - m); each step is one pass over the row."""
    hi = tl.full((), 2147483647, tl.int64)
    probes = tl.arange(0, PROBES)
    offs = tl.arange(0, BLOCK)
    for _ in range(STEPS):
        mids = lo + ((hi - lo) * probes) // PROBES
        above = tl.zeros([PROBES], tl.float32)
        for c0 in range(0, vocab, BLOCK):
            cols = c0 + offs
            s = _scores(row_ptr, cols, vocab, temperature)
            key = tl.where(cols < vocab, _order_key(s), -2147483648).to(tl.int64)
            if MASS:
                w = tl.exp(s - m)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            above += tl.sum(tl.where(key[:, None] > mids[None, :], w[:, None], 0.0), axis=0)
        below = above < budget
        hi = tl.min(tl.where(below, mids, hi), axis=0)
        lo = tl.max(tl.where(below, lo, mids + 1), axis=0)
    return hi


@triton.jit
def _select_kernel(logits_ptr, stride, rows_ptr, seed_ptr, out_ptr, vocab, n_chunks, values_ptr, top_k_ptr, best_ptr,
                   index_ptr, cand_ptr, low_ptr, sum_ptr, exact_ptr, MODE: tl.constexpr,
                   TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, ROW_OFFSET: tl.constexpr,
                   KC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CAND: tl.constexpr, BLOCK: tl.constexpr,
                   PROBES: tl.constexpr, STEPS: tl.constexpr, ROW_STEPS: tl.constexpr, TRACE: tl.constexpr):
    pid = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_C)
    c_ok = chunks < n_chunks
    slots = pid * n_chunks + chunks
    if MODE < 2:  # greedy or unfiltered: the best chunk winner, ties to the first index
        winner = tl.load(best_ptr + slots, mask=c_ok, other=float("-inf"))
        winner_index = tl.load(index_ptr + slots, mask=c_ok, other=vocab)
        tl.store(out_ptr + pid, tl.min(tl.where(winner == tl.max(winner, axis=0), winner_index, vocab), axis=0)
                 .to(tl.int64))
    else:
        _select_filtered(logits_ptr, stride, rows_ptr, seed_ptr, out_ptr, vocab, n_chunks, values_ptr, top_k_ptr,
                         best_ptr, cand_ptr, low_ptr, sum_ptr, exact_ptr, pid, slots, c_ok, TOP_K, TOP_P, MIN_P,
                         ROW_OFFSET, KC, BLOCK_CAND, BLOCK, PROBES, STEPS, ROW_STEPS, TRACE)


@triton.jit
def _select_filtered(logits_ptr, stride, rows_ptr, seed_ptr, out_ptr, vocab, n_chunks, values_ptr, top_k_ptr,
                     best_ptr, cand_ptr, low_ptr, sum_ptr, exact_ptr, pid, slots, c_ok, TOP_K: tl.constexpr,
                     TOP_P: tl.constexpr, MIN_P: tl.constexpr, ROW_OFFSET: tl.constexpr, KC: tl.constexpr,
                     BLOCK_CAND: tl.constexpr, BLOCK: tl.constexpr, PROBES: tl.constexpr, STEPS: tl.constexpr,
                     ROW_STEPS: tl.constexpr, TRACE: tl.constexpr):
    temperature = tl.load(values_ptr)  # the values are device scalars: a graph serves any of them
    top_p = tl.load(values_ptr + 1)
    min_p = tl.load(values_ptr + 2)
    top_k = tl.load(top_k_ptr).to(tl.float32)  # a count: compared with sums of weights
    # Every token whose key is above `low` is a candidate (INT_MIN: every token is).
    low = tl.max(tl.load(low_ptr + slots, mask=c_ok, other=-2147483648), axis=0)
    j = tl.arange(0, BLOCK_CAND)
    j_ok = j < n_chunks * KC
    packed = tl.load(cand_ptr + pid.to(tl.int64) * n_chunks * KC + j, mask=j_ok, other=0)
    key = tl.where(j_ok, packed >> 32, -2147483648)
    index = packed.to(tl.int32)
    valid = key > -2147483648
    s = tl.where(valid, _key_score(key), float("-inf"))
    m = tl.max(s, axis=0)  # the row's max is always a candidate
    e = tl.where(valid, tl.exp(s - m), 0.0)
    if TOP_P and not TOP_K:
        c_max = tl.load(best_ptr + slots, mask=c_ok, other=float("-inf"))
        c_sum = tl.load(sum_ptr + slots, mask=c_ok, other=0.0)
        z = tl.sum(tl.where(c_ok, tl.exp(c_max - m) * c_sum, 0.0), axis=0)  # top-p's z: the whole row
    # keep key >= lo_k; `exact`: the filters drop every token at or below `low`, so the candidates
    # hold the answer (thresholds found among them above `low` are the whole row's).
    lo_k = low + 1
    exact = low == -2147483648
    k_exact = exact
    if TOP_K:
        x = _smallest_above(key, valid.to(tl.float32), lo_k - 1, top_k, PROBES, STEPS)
        k_exact = exact | (x > low)
        exact = k_exact
        lo_k = tl.maximum(lo_k, x)
    if TOP_P:
        if TOP_K:
            z = tl.sum(tl.where(key >= lo_k, e, 0.0), axis=0)
        x = _smallest_above(key, e, lo_k - 1, top_p * z, PROBES, STEPS)
        exact = exact | (x > low)
        lo_k = tl.maximum(lo_k, x)
    if MIN_P:
        exact = exact | (tl.exp(_key_score(low) - m) < min_p)
    if TOP_K and TOP_P:
        exact = exact & k_exact  # top-p's z is the mass of the whole top-k set
    key_a, key_b = _row_keys(rows_ptr, seed_ptr, pid, ROW_OFFSET)
    if exact:
        keep = key >= lo_k
        if MIN_P:
            keep = keep & (e >= min_p)
        g = tl.where(keep, _gumbel(s, index, key_a, key_b), float("-inf"))
        top = tl.max(g, axis=0)
        choice = tl.min(tl.where(g == top, index, vocab), axis=0)
    else:  # the same searches and the Gumbel-max, in passes over the whole row
        row_ptr = logits_ptr + pid.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        lo_k = tl.full((), -2147483648, tl.int64)
        if TOP_K:
            lo_k = _row_smallest_above(row_ptr, vocab, temperature, m, lo_k, top_k, False, 8,
                                       ROW_STEPS, BLOCK)
        if TOP_P:
            if TOP_K:
                z = tl.zeros([BLOCK], tl.float32)
                for c0 in range(0, vocab, BLOCK):
                    cols = c0 + offs
                    sc = _scores(row_ptr, cols, vocab, temperature)
                    z += tl.where((cols < vocab) & (_order_key(sc) >= lo_k), tl.exp(sc - m), 0.0)
                z = tl.sum(z, axis=0)
            lo_k = _row_smallest_above(row_ptr, vocab, temperature, m, lo_k, top_p * z, True, 8, ROW_STEPS, BLOCK)
        best_g = tl.full((), float("-inf"), tl.float32)
        choice = tl.full((), 0, tl.int32)
        for c0 in range(0, vocab, BLOCK):
            cols = c0 + offs
            sc = _scores(row_ptr, cols, vocab, temperature)
            keep = (cols < vocab) & (_order_key(sc) >= lo_k)
            if MIN_P:
                keep = keep & (tl.exp(sc - m) >= min_p)
            g = tl.where(keep, _gumbel(sc, cols, key_a, key_b), float("-inf"))
            cm = tl.max(g, axis=0)
            ci = tl.min(tl.where(g == cm, cols, vocab), axis=0)
            choice = tl.where(cm > best_g, ci, choice)
            best_g = tl.maximum(cm, best_g)
    tl.store(out_ptr + pid, choice.to(tl.int64))
    if TRACE:
        tl.store(exact_ptr + pid, exact.to(tl.int32))


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):  # a view: the kernels take its low 32 bits (`.to(tl.uint32)`), i.e. & M32
        return seed.reshape(1)
    return torch.full((1,), seed & M32, dtype=torch.int64, device=device)


def _values(temperature, top_p, min_p, dev) -> torch.Tensor:
    """temperature, top_p and min_p as one float32 [3] vector: a view where they are consecutive
    elements of one float32 buffer already (`sampling.DeviceSampling` keeps them so), else a stack."""
    parts = (temperature, top_p, min_p)
    if all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 0 for v in parts):
        first = temperature.data_ptr()
        if all(v.untyped_storage().data_ptr() == temperature.untyped_storage().data_ptr()
               and v.data_ptr() == first + 4 * i for i, v in enumerate(parts)):
            return temperature.as_strided((3,), (1,))
    return torch.cat([_scalar(v, torch.float32, dev) for v in parts])


def _scalar(value, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-element device tensor of `value` (a number, or a 0-d tensor the engine keeps on the device)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(1).to(dtype)
    return torch.full((1,), value, dtype=dtype, device=device)


def _sample(logits: torch.Tensor, rows: torch.Tensor, row_offset: bool, mode: Mode, temperature, top_k, top_p, min_p,
            seed, trace: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    dev = logits.device
    out = torch.empty(n, dtype=torch.int64, device=dev) if out is None else out
    filters = dict(TOP_K=mode.top_k, TOP_P=mode.top_p, MIN_P=mode.min_p) if not mode.greedy else \
        dict(TOP_K=False, TOP_P=False, MIN_P=False)
    kind = 0 if mode.greedy else 2 if any(filters.values()) else 1
    # A small vocabulary is all candidates (chunks of CANDIDATES tokens): nothing to select, no fallback.
    chunk = CANDIDATES if vocab <= 16 * CANDIDATES else min(CHUNK, triton.next_power_of_2(vocab))
    n_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty(n * n_chunks, dtype=torch.float32, device=dev)
    index = torch.empty(n * n_chunks, dtype=torch.int32, device=dev)
    if kind == 2:
        cand = torch.empty(n * n_chunks * CANDIDATES, dtype=torch.int64, device=dev)
        low = torch.empty(n * n_chunks, dtype=torch.int64, device=dev)
        total = torch.empty(n * n_chunks, dtype=torch.float32, device=dev)
    else:
        cand = low = total = best  # unused
    if mode.greedy:  # reads no value: nothing to prepare (no launch)
        values, top_k_t, seed_t = best, index, index
    else:
        # temperature, top_p and min_p in one float32 vector; on the engine's path they are device
        # tensors already (a view of DeviceSampling's buffer), so no value is read back or copied from the host.
        values = _values(temperature, top_p, min_p, dev)
        top_k_t = _scalar(top_k, torch.int64, dev)
        seed_t = _seed_tensor(seed, dev)
    if n == 0:
        return out
    _chunk_kernel[(n, n_chunks)](
        logits, logits.stride(0), rows, seed_t, vocab, values, best, index, cand, low, total, MODE=kind,
        ROW_OFFSET=row_offset, NEED_SUM=filters["TOP_P"] and not filters["TOP_K"], CHUNK=chunk, KC=CANDIDATES,
        num_warps=16)
    _select_kernel[(n,)](
        logits, logits.stride(0), rows, seed_t, out, vocab, n_chunks, values, top_k_t, best, index,
        cand, low, total, trace if trace is not None else out, MODE=kind, ROW_OFFSET=row_offset, KC=CANDIDATES,
        BLOCK_C=max(2, triton.next_power_of_2(n_chunks)),
        BLOCK_CAND=max(2, triton.next_power_of_2(n_chunks * CANDIDATES)),
        BLOCK=min(1024, triton.next_power_of_2(vocab)), PROBES=PROBES, STEPS=_search_steps(PROBES),
        ROW_STEPS=_search_steps(8), TRACE=trace is not None, num_warps=16, **filters)
    return out


def sample(logits: torch.Tensor, rows: torch.Tensor, *, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0,
           mode: Mode | None = None) -> torch.Tensor:
    """Triton: same contract as `sample_ref`."""
    mode = _mode(mode, temperature, top_k, top_p, min_p)
    return _sample(logits, rows, False, mode, temperature, top_k, top_p, min_p, seed)


@triton.jit
def _accept_kernel(block_ptr, y_ptr, acc_ptr, tail_ptr, b, BLOCK: tl.constexpr, PACK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < b - 1
    draft = tl.load(block_ptr + 1 + i, mask=ok, other=-1)
    target = tl.load(y_ptr + i, mask=ok, other=-2)
    miss = tl.where(ok & (draft != target), i, b - 1)
    a = tl.min(miss, axis=0).to(tl.int64)  # drafts accepted: up to the first mismatch
    tl.store(acc_ptr, a)
    if PACK:  # acc_ptr is packed[0], y_ptr packed[1:1+b]: the block goes after y; count and bonus to tail
        in_block = i < b
        tl.store(acc_ptr + 1 + b + i, tl.load(block_ptr + i, mask=in_block), mask=in_block)
        tl.store(tail_ptr, a + 1)
        tl.store(tail_ptr + 1, tl.load(y_ptr + a))


def accept(logits: torch.Tensor, block_ids: torch.Tensor, cache_len: torch.Tensor, *, temperature, top_k=0, top_p=1.0,
           min_p=0.0, seed=0, mode: Mode | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: same contract as `accept_ref`, with no host synchronisation: the two sampling passes
    read the positions from `cache_len` on the device, then one small kernel counts the accepted
    drafts."""
    mode = _mode(mode, temperature, top_k, top_p, min_p)
    b = logits.shape[0]
    y = _sample(logits, cache_len, True, mode, temperature, top_k, top_p, min_p, seed)
    accepted = torch.empty((), dtype=torch.int64, device=logits.device)
    _accept_kernel[(1,)](block_ids, y, accepted, accepted, b, BLOCK=max(2, triton.next_power_of_2(b)), PACK=False)
    return y, accepted


def verdict(logits: torch.Tensor, block_ids: torch.Tensor, cache_len: torch.Tensor, *, temperature, top_k=0,
            top_p=1.0, min_p=0.0, seed=0, mode: Mode | None = None) -> Verdict:
    """Triton: same contract as `verdict_ref`, in `accept`'s three launches: the sampler writes y into
    the packed result, and the accept kernel also writes a, the block, a + 1 and the next bonus (the
    packing, the count and the bonus's gather cost no launch of their own)."""
    mode = _mode(mode, temperature, top_k, top_p, min_p)
    b, dev = logits.shape[0], logits.device
    packed = torch.empty(1 + 2 * b, dtype=torch.int64, device=dev)
    tail = torch.empty(2, dtype=torch.int64, device=dev)
    _sample(logits, cache_len, True, mode, temperature, top_k, top_p, min_p, seed, out=packed[1:1 + b])
    _accept_kernel[(1,)](block_ids.contiguous(), packed[1:1 + b], packed, tail, b,
                         BLOCK=max(2, triton.next_power_of_2(b)), PACK=True)
    return Verdict(packed, tail[0], tail[1:])
