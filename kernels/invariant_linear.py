"""A batch-invariant linear layer for the rows a step sees (decode M = 1, verify M = b, the draft block;
M ≤ 32): `out = x @ w.T + b`, each output element reduced in the same order whatever M is.

cuBLAS picks its kernel and split-K from M, so a verify row and the decode of the same token round
differently in bf16 (research/gpu-review-2.md §2.1). Here one compiled configuration serves every M:
rows in tiles of BLOCK_M (padded and masked; M is not specialised, so M = 1 and M = 16 run the same
binary), a fixed BLOCK_N × BLOCK_K tiling, and K cut into `splits(N, K)` slices, a number chosen from
the weight's shape alone. Each slice's fp32 partial sums go to a scratch buffer; then the program takes a
ticket on its output tile's counter (an atomic add), and the one that draws the last ticket adds the
slices' partials in slice order, then the bias, then rounds once to x's dtype, and puts the counter back
to 0. Which program finishes last varies from run to run, but the order of the sum does not: every
slice's partial is read back from the scratch, slice 0 first. One launch, the merge folded into it (the
two-launch form, a merge kernel after the partials, is kept as `merge="launch"` to test that the bits
are the same). A weight reduced in one slice, one whose N alone fills the GPU, writes its output
directly. A row's sums therefore do not depend on M, on the row's place in its tile, or on the other rows.

The tickets are one persistent zeroed int32 buffer per device (`tickets`), reused by every call: each
launch leaves it zeroed, so a CUDA graph replays it as captured. Kernels on one device run one after
another (the engine's step is one stream; with PDL, kernels/pdl.py, a kernel waits for the one before
it before touching memory), so one buffer serves them all.

Any mix of bf16/fp32 activations and weights; accumulation in fp32 (fp32 products in IEEE precision,
not TF32). The weight streams once per row tile, so up to BLOCK_M rows cost about what one does.
"""
from __future__ import annotations

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
# splits × N-tiles aims at this many programs (two waves on a 132-SM H100), whatever the device: the
# split count must not depend on anything but the weight's shape, or two GPUs would round differently.
TARGET_PROGRAMS = 264
MIN_K_PER_SPLIT = 4 * BLOCK_K  # a slice streams at least this many columns
MERGE_BLOCK = 256  # the two-launch form's merge kernel (merge="launch")
MERGES = ("last", "launch")


def invariant_linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x [..., K] @ w[N, K].T (+ b[N]) computed in float32, rounded once to x's dtype."""
    out = x.float() @ w.float().T
    if b is not None:
        out = out + b.float()
    return out.to(x.dtype)


def splits(n: int, k: int) -> int:
    """How many K slices a weight [n, k] is reduced in: from its shape only, never from M."""
    tiles_n = -(-n // BLOCK_N)
    want = -(-TARGET_PROGRAMS // tiles_n)
    return max(1, min(want, k // MIN_K_PER_SPLIT))


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import pdl  # noqa: E402

_TICKETS: dict[torch.device, torch.Tensor] = {}


def tickets(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed per-tile counters of `device`, at least `tiles` of them: allocated once (a warm-up
    allocates it before any capture) and grown only for a launch with more output tiles than any before."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < tiles:
        t = _TICKETS[device] = torch.zeros(max(1024, triton.next_power_of_2(tiles)), dtype=torch.int32,
                                           device=device)
    return t


# Triton's CPU interpreter mis-computes tl.dot on bfloat16 operands (as kernels/attention.py notes):
# under TRITON_INTERPRET the operands are upcast to float32 first. On a GPU the dots stay in bf16.
_UPCAST = __import__("os").environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _finish(acc, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """out = acc + bias, rounded once to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ticket(tickets_ptr, n_splits):
    """After this program's partials are stored: a ticket on its output tile's counter. Returns (whether
    it is the last of the tile's n_splits programs, the counter), the last one then sums the partials."""
    tile = tickets_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    tl.debug_barrier()  # every thread's partial is stored before the ticket's release publishes them
    ticket = tl.atomic_add(tile, 1, sem="acq_rel")
    return ticket == n_splits - 1, tile


@triton.jit
def _sum_splits(rows, cols, row_ok, col_ok, n_splits, M, width, part_ptr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """part[0] + part[1] + ... of a tile, in slice order from zero, as the merge kernel adds them (the
    partials read past L1: other SMs wrote them)."""
    mask = row_ok[:, None] & col_ok[None, :]
    at = part_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(0, n_splits):
        total += tl.load(at + s * M * width, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _store(acc, rows, cols, row_ok, col_ok, split, n_splits, M, N, part_ptr, b_ptr, out_ptr, tickets_ptr,
           DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """A tile's epilogue, shared with kernels/quant_linear.py: one slice of K (DIRECT) adds the bias and
    writes the output in its dtype; otherwise the fp32 partial goes to its split's scratch row, and with
    FOLD the program that finishes the tile last adds the partials in order, the bias, and writes the
    output (without FOLD a merge kernel does, after this launch)."""
    if DIRECT:
        _finish(acc, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS)
    else:
        tl.store(part_ptr + (split * M + rows.to(tl.int64))[:, None] * N + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])
        if FOLD:
            last, tile = _ticket(tickets_ptr, n_splits)
            if last:
                total = _sum_splits(rows, cols, row_ok, col_ok, n_splits, M, N, part_ptr, BLOCK_M, BLOCK_N)
                _finish(total, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS)
                tl.atomic_xchg(tile, 0)  # ready for the next launch (and a graph's next replay)


@triton.jit(do_not_specialize=["M"])  # one binary for every M: M = 1 is not folded into a constant
def _partial_kernel(x_ptr, w_ptr, part_ptr, b_ptr, out_ptr, tickets_ptr, M, N, K, k_per_split, n_splits,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                    DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr):
    """part[split, m, n] = sum over this split's K slice of x[m, k] * w[n, k], in BLOCK_K steps, then
    `_store`. With DIRECT (one slice: a weight whose N alone fills the GPU) the sum plus the bias goes
    straight to out."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = k0 + ks < k_end
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + ks)[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST or x.dtype != w.dtype:  # a mixed pair meets in fp32 (exact products either way)
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    _store(acc, rows, cols, row_ok, col_ok, split, n_splits, M, N, part_ptr, b_ptr, out_ptr, tickets_ptr, DIRECT,
           HAS_BIAS, FOLD, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["MN"])  # nor is M × N: one merge binary per (N, K) as well
def _merge_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = (part[0] + part[1] + ... in order) + bias, rounded once: the two-launch form's merge."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * MN + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + idx % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)


def plan(n: int, k: int, n_splits: int | None = None) -> tuple[int, int]:
    """(slices, columns per slice) for a weight [n, k]: `splits(n, k)` (or the override), each slice
    starting on a BLOCK_K boundary, so that no slice is empty."""
    s = n_splits or splits(n, k)
    k_per_split = max(1, triton.cdiv(triton.cdiv(k, s), BLOCK_K)) * BLOCK_K
    return max(1, triton.cdiv(k, k_per_split)), k_per_split  # (k = 0: one slice of nothing, the bias alone)


def merge_after(s: int, m: int, n: int, part: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                has_bias: bool, merge: str) -> None:
    """The two-launch form's second launch (merge="launch", weights reduced in slices only)."""
    assert merge in MERGES, merge
    if s > 1 and merge == "launch":
        _merge_kernel[(triton.cdiv(m * n, MERGE_BLOCK),)](
            part, bias, out, m * n, n, SPLITS=s, HAS_BIAS=has_bias, BLOCK=MERGE_BLOCK, num_warps=4)


def invariant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                     n_splits: int | None = None, merge: str = "last") -> torch.Tensor:
    """Triton: same contract as `invariant_linear_ref`. `n_splits` overrides `splits(N, K)` (tests
    plant an M-dependent choice with it to show the invariance tests fail); `merge="launch"` merges the
    slices in a second launch instead of in the last program of each tile (the same bits)."""
    n, k = w.shape
    assert x.shape[-1] == k and (b is None or b.shape == (n,)), (x.shape, w.shape, None if b is None else b.shape)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k).contiguous()
    w = w.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    s, k_per_split = plan(n, k, n_splits)
    part = torch.empty(s, m, n, dtype=torch.float32, device=x.device) if s > 1 else out
    bias = b if b is not None else out
    grid = (triton.cdiv(n, BLOCK_N), s, triton.cdiv(m, BLOCK_M))
    _partial_kernel[grid](
        x2, w, part, bias, out, tickets(x.device, grid[0] * grid[2]), m, n, k, k_per_split, s,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=_UPCAST, DIRECT=s == 1, HAS_BIAS=b is not None,
        FOLD=merge == "last", **pdl.launch(x.device), num_warps=4, num_stages=4)
    merge_after(s, m, n, part, bias, out, b is not None, merge)
    return out.reshape(*lead, n)
