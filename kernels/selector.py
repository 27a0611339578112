"""DFlash2's candidate selector (dflash_cli/dflash2.py, research/dflash2.md §1.4) in one launch: each draft row's
top-k of the head's logits, the low-rank bigram rescoring and the greedy walk from the anchor.

    candidates_t = the k largest logits of row t (values descending, the lower id first among equals)
    u_t(b)       = head_logits(logit_t(b))          (× multiplier in fp32; the softcap c·tanh(z / c) in fp64,
                                                     rounded once to fp32)
    S_t(a, b)    = u_t(b) + tree_sum_j((A[a, j] · p_t[j]) · B[b, j])      p = P h (given), all in fp32
    c_0 = argmax_b S_0(anchor, b),  c_t = argmax_b S_t(c_(t-1), b)       (the lowest b among equal scores)

`tree_sum` is the contract that lets a kernel give the reference's bits on any device: the r terms, padded
with zeros to a power of two, are added in adjacent pairs, then pairs of those, and so on (a sum of two
is the same whichever comes first, so no device's reduction order enters). Every product is rounded
before it is summed (the kernel is compiled without FMA). The softcap's tanh is taken in fp64 and rounded
once to fp32, which is the correctly rounded tanh but for a ~2^-28-likely case: torch's, numpy's and
libdevice's fp32 tanh differ from each other by an ulp, their fp64 ones rounded to fp32 do not.

The kernel: program (row t, vocab block j) finds its block's top-k (k passes of a max and the lowest id at
it), stores them and takes a ticket on row t's counter (acq_rel); the last of the row's blocks merges the
row's n_blocks × k survivors the same way, stores the row's k (value, id) pairs, resets the row's counter
and takes a ticket on the step's counter; the last row to finish walks the L rows: per row one k × r tile of
B[candidates], the chosen predecessor's A row times p_t, the tree over r and an argmax, and resets that
counter (a CUDA graph replays the launch from zeroed counters). The walk needs S_t(c_(t-1), ·) only, not
the k × k lattice the reference builds (the same entries, the same bits). Its loads run one row ahead
(the A rows of all k predecessors, the chosen one picked in registers), so no load waits on a choice.

Cost at the released sizes (V 248,320, k 16, r 256, L ≤ 15): 61 blocks of 4,096 logits per row (each k
max/min passes over its block: ~130k compares, 16 KB read); 15 merges of 976 survivors; one walk of 15 rows
× (16 × 256 products + 8 tree levels), ~60k flops and 15 × 16 KB of codebook rows (bf16), on one SM.
Compiled for sm_90: 111-128 registers a thread (8 warps), no spills, 2-4 KB of shared memory. Not timed
(no GPU here): benchmarks/kernel_speed.py's "DFlash2 selector" rows are the measurement to make.
"""
from __future__ import annotations

import torch


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over x's last dim as the kernel adds it: zero-padded to a power of two, adjacent pairs first."""
    n = x.shape[-1]
    width = 1 << max(0, n - 1).bit_length()
    if width != n:
        x = torch.cat((x, x.new_zeros(*x.shape[:-1], width - n)), -1)
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def top_k_ref(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [L, k] of each row's k largest logits, values descending and the lower id first among
    equal values (also where the k-th value's ties cross the cut: the lowest ids of them are kept)."""
    kth = logits.topk(k, dim=-1).values[:, -1:]
    ids = torch.arange(logits.shape[-1], device=logits.device)
    # every logit above the k-th is kept (fewer than k of them); the lowest ids equal to it fill the rest
    key = torch.where(logits > kth, float(logits.shape[-1]),
                      torch.where(logits == kth, -ids.to(torch.float32), float("-inf")))
    chosen = key.topk(k, dim=-1).indices.sort(-1).values  # the set, ids ascending
    values = logits.gather(1, chosen)
    order = values.sort(dim=-1, descending=True, stable=True).indices  # stable: the lower id first among equals
    return values.gather(1, order), chosen.gather(1, order)


def unary_ref(values: torch.Tensor, multiplier: float, softcap: float | None) -> torch.Tensor:
    """head_logits on the candidates' logits, in fp32 (the softcap in fp64, rounded once)."""
    z = values.float()
    if multiplier != 1.0:
        z = z * multiplier
    if softcap:
        c = float(torch.tensor(softcap, dtype=torch.float32))  # the kernel receives c as an fp32 argument
        z = (torch.tanh(z.double() / c) * c).float()
    return z


def lattice_ref(p: torch.Tensor, logits: torch.Tensor, anchor: torch.Tensor, predecessor: torch.Tensor,
                successor: torch.Tensor, top_k: int, multiplier: float = 1.0, softcap: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates [L, k], scores [L, k, k]): S_t(a, b) for the k candidates a of row t - 1 (row 0: the
    anchor, repeated) and the k candidates b of row t. p: P h [L, r]; logits: the head's raw logits [L, V]."""
    values, candidates = top_k_ref(logits, top_k)
    previous = torch.cat((anchor.view(1, 1).expand(1, top_k), candidates[:-1]))  # [L, k]
    left = predecessor[previous].float() * p.float()[:, None, :]  # A[a] ⊙ P h_t
    right = successor[candidates].float()  # B[b]
    edges = tree_sum(left[:, :, None, :] * right[:, None, :, :])  # [L, k, k]
    return candidates, unary_ref(values, multiplier, softcap)[:, None, :] + edges


def selector_walk_ref(scores: torch.Tensor, candidates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy walk over a lattice (scores [L, k, k], candidates [L, k]): the L drafted ids."""
    chosen = torch.zeros(1, dtype=torch.int64, device=scores.device)  # row 0: every predecessor is the anchor
    path = []
    for t in range(scores.shape[0]):
        chosen = scores[t].index_select(0, chosen).argmax(-1)  # argmax: the first maximal index
        path.append(chosen)
    if out is None:
        return candidates.gather(1, torch.stack(path)).view(-1)
    return torch.gather(candidates, 1, torch.stack(path), out=out.view(-1, 1)).view(-1)


def selector_ref(p: torch.Tensor, logits: torch.Tensor, anchor: torch.Tensor, predecessor: torch.Tensor,
                 successor: torch.Tensor, top_k: int, multiplier: float = 1.0, softcap: float | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The L drafted ids (written into `out` [L] when given). p: P h [L, r]; logits [L, V]; anchor: [1] id;
    predecessor, successor: the codebooks A, B [V, r]."""
    candidates, scores = lattice_ref(p, logits, anchor, predecessor, successor, top_k, multiplier, softcap)
    return selector_walk_ref(scores, candidates, out)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .invariant_linear import tickets  # noqa: E402  (the per-device zeroed counters: L rows + 1 here)

BLOCK_V = 4096  # logits per program


@triton.jit
def _top_k(values, ids, alive, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NO_ID: tl.constexpr):
    """The k largest of `values` where `alive`, descending, the lowest id first among equals: (values, ids)
    [BLOCK_K] (ids NO_ID where fewer than k are alive)."""
    ranks = tl.arange(0, BLOCK_K)
    top_v = tl.full([BLOCK_K], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_K], NO_ID, tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(alive, values, float("-inf")), axis=0)
        pick = tl.min(tl.where(alive & (values == best), ids, NO_ID), axis=0)
        top_v = tl.where(ranks == j, best, top_v)
        top_i = tl.where(ranks == j, pick, top_i)
        alive = alive & (ids != pick)
    return top_v, top_i


@triton.jit
def _tanh64(y):
    """tanh in fp64 from exp (the interpreter has no libdevice): within a few fp64 ulps, so rounded to fp32 it
    is the reference's fp64 tanh rounded to fp32. Near 0 its series (1 - e^-2|y| would cancel)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = a * a
    small = a * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0 - y2 * (17.0 / 315.0))))
    t = tl.where(a < 1e-3, small, big)
    return tl.where(y < 0, -t, tl.where(y == 0, y, t))  # tanh(±0) = ±0


@triton.jit
def _tree_sum(x, ROWS: tl.constexpr, WIDTH: tl.constexpr, LOG_WIDTH: tl.constexpr):
    """Σ over the last dim of x [ROWS, WIDTH] (a power of two), adjacent pairs first: `tree_sum`."""
    for level in tl.static_range(LOG_WIDTH):
        a, b = tl.split(tl.reshape(x, [ROWS, WIDTH >> (level + 1), 2]))
        x = a + b
    return tl.reshape(x, [ROWS])


@triton.jit
def _codebook_rows(ptr, ids, rank, r, k_ok, r_ok):
    """The codebook rows of `ids` [BLOCK_K] as fp32 [BLOCK_K, BLOCK_R] (zeros where masked)."""
    return tl.load(ptr + ids[:, None] * rank + r[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _walk_row(t, rows, row_i_ptr, row_v_ptr, p_ptr, p_row, b_ptr, rank, multiplier, softcap, ranks, r, k_ok, r_ok,
              BLOCK_K: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """Row t's part of the walk (nothing is loaded for t = rows): (its candidates, their unary scores, p_t,
    B[candidates])."""
    k_ok = k_ok & (ranks * 0 + t < rows)  # as tensors: the interpreter takes no Python bool in a mask
    r_ok = r_ok & (r * 0 + t < rows)
    cand = tl.load(row_i_ptr + t * BLOCK_K + ranks, mask=k_ok, other=0, cache_modifier=".cg")
    z = tl.load(row_v_ptr + t * BLOCK_K + ranks, mask=k_ok, other=0.0, cache_modifier=".cg")
    if SCALE:
        z = z * multiplier
    if SOFTCAP:
        c = (softcap + tl.zeros([BLOCK_K], tl.float32)).to(tl.float64)  # c as an fp32 argument
        z = (_tanh64(z.to(tl.float64) / c) * c).to(tl.float32)
    p = tl.load(p_ptr + t * p_row + r, mask=r_ok, other=0.0).to(tl.float32)
    return cand, z, p, _codebook_rows(b_ptr, cand.to(tl.int64), rank, r, k_ok, r_ok)


@triton.jit
def _selector_kernel(logits_ptr, p_ptr, anchor_ptr, a_ptr, b_ptr, out_ptr, part_v_ptr, part_i_ptr, row_v_ptr,
                     row_i_ptr, tickets_ptr, vocab, rank, rows, n_blocks, logits_row, p_row, multiplier, softcap,
                     TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_MERGE: tl.constexpr,
                     BLOCK_R: tl.constexpr, LOG_R: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_K)
    no_id = 2147483647
    # 1. this block's top-k
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * logits_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
    top_v, top_i = _top_k(x, cols, ok, TOP_K, BLOCK_K, no_id)
    part = (row * n_blocks + block) * BLOCK_K + ranks
    tl.store(part_v_ptr + part, top_v)
    tl.store(part_i_ptr + part, top_i)
    tl.debug_barrier()  # every thread's stores are made before the ticket's release publishes them
    counter = tickets_ptr + row
    if tl.atomic_add(counter, 1, sem="acq_rel") == n_blocks - 1:
        # 2. the row's last block merges the row's n_blocks × k survivors (ids are unique: ties by id)
        m = tl.arange(0, BLOCK_MERGE)
        m_ok = m < n_blocks * BLOCK_K
        v = tl.load(part_v_ptr + row * n_blocks * BLOCK_K + m, mask=m_ok, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(part_i_ptr + row * n_blocks * BLOCK_K + m, mask=m_ok, other=no_id, cache_modifier=".cg")
        top_v, top_i = _top_k(v, i, m_ok & (i < vocab), TOP_K, BLOCK_K, no_id)
        tl.store(row_v_ptr + row * BLOCK_K + ranks, top_v)
        tl.store(row_i_ptr + row * BLOCK_K + ranks, top_i)
        tl.atomic_xchg(counter, 0)  # ready for the next launch (and a graph's next replay)
        tl.debug_barrier()
        step = tickets_ptr + rows
        if tl.atomic_add(step, 1, sem="acq_rel") == rows - 1:
            # 3. the last row to finish walks the rows from the anchor. Each row's loads are issued one row
            # ahead (none depends on the walk: the A rows of all k predecessors are loaded, the chosen one
            # picked in registers), so the chain from one choice to the next is arithmetic only.
            k_ok = ranks < TOP_K
            r = tl.arange(0, BLOCK_R)
            r_ok = r < rank
            anchor = tl.load(anchor_ptr).to(tl.int64) + tl.zeros([BLOCK_K], tl.int64)  # row 0's predecessors
            cand, z, p, right = _walk_row(0, rows, row_i_ptr, row_v_ptr, p_ptr, p_row, b_ptr, rank, multiplier,
                                          softcap, ranks, r, k_ok, r_ok, BLOCK_K, SCALE, SOFTCAP)
            left_all = _codebook_rows(a_ptr, anchor, rank, r, k_ok, r_ok)  # rows ≥ 1 here
            chosen = tl.zeros([], tl.int32)  # row 0: every predecessor is the anchor
            for t in range(0, rows):
                cand_n, z_n, p_n, right_n = _walk_row(t + 1, rows, row_i_ptr, row_v_ptr, p_ptr, p_row, b_ptr, rank,
                                                      multiplier, softcap, ranks, r, k_ok, r_ok, BLOCK_K, SCALE,
                                                      SOFTCAP)
                left_n = _codebook_rows(a_ptr, cand.to(tl.int64), rank, r, k_ok & (ranks * 0 + t + 1 < rows), r_ok)
                # A[c_(t-1)] bit for bit: the other rows add -0.0, which leaves every x (+0.0 included) as it is
                a_row = tl.sum(tl.where(ranks[:, None] == chosen, left_all, -0.0), axis=0)
                products = tl.where(k_ok[:, None] & r_ok[None, :], (a_row * p)[None, :] * right, 0.0)
                s = z + _tree_sum(products, BLOCK_K, BLOCK_R, LOG_R)
                best = tl.max(tl.where(k_ok, s, float("-inf")), axis=0)
                chosen = tl.min(tl.where(k_ok & (s == best), ranks, BLOCK_K), axis=0)  # argmax: the lowest
                tl.store(out_ptr + t, tl.sum(tl.where(ranks == chosen, cand, 0), axis=0).to(tl.int64))  # one term
                cand, z, p, right, left_all = cand_n, z_n, p_n, right_n, left_n
            tl.atomic_xchg(step, 0)


def selector(p: torch.Tensor, logits: torch.Tensor, anchor: torch.Tensor, predecessor: torch.Tensor,
             successor: torch.Tensor, top_k: int, multiplier: float = 1.0, softcap: float | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: same contract as `selector_ref`, one launch."""
    rows, vocab = logits.shape
    rank = predecessor.shape[1]
    assert logits.stride(1) == 1 and p.stride(1) == 1
    predecessor, successor = predecessor.contiguous(), successor.contiguous()  # the checkpoint's: already so
    assert 0 < top_k <= vocab and successor.shape == predecessor.shape and p.shape == (rows, rank)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    if not rows:
        return out
    block_v = min(BLOCK_V, triton.next_power_of_2(vocab))
    n_blocks = triton.cdiv(vocab, block_v)
    block_k = max(2, triton.next_power_of_2(top_k))
    block_r = max(2, triton.next_power_of_2(rank))
    part_v = torch.empty((rows, n_blocks, block_k), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((rows, n_blocks, block_k), dtype=torch.int32, device=logits.device)
    row_v = torch.empty((rows, block_k), dtype=torch.float32, device=logits.device)
    row_i = torch.empty((rows, block_k), dtype=torch.int32, device=logits.device)
    _selector_kernel[(rows, n_blocks)](
        logits, p, anchor, predecessor, successor, out, part_v, part_i, row_v, row_i,
        tickets(logits.device, rows + 1), vocab, rank, rows, n_blocks, logits.stride(0), p.stride(0),
        float(multiplier), float(softcap or 0.0), TOP_K=top_k, BLOCK_K=block_k, BLOCK_V=block_v,
        BLOCK_MERGE=triton.next_power_of_2(n_blocks * block_k), BLOCK_R=block_r, LOG_R=block_r.bit_length() - 1,
        SCALE=multiplier != 1.0, SOFTCAP=bool(softcap), num_warps=8 if block_v >= 2048 else 4,
        enable_fp_fusion=False)  # no FMA: the reference rounds every product before it is summed
    return out
