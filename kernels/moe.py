"""Mixture-of-experts for a few tokens at a time (decode, a verify block, a draft-sized prefill chunk):
the router and the experts' SwiGLU, with each row's result independent of the other rows.

Batch invariance is what keeps speculative decoding exact here: a verify row (T = B) and a decode row
(T = 1) must route to the same experts and get the same expert output bit for bit, or a router tie
that flips between them changes the token. So nothing reduces across rows or splits a row's
reduction: router logits are per-row dot products in a fixed order, each (token, expert) pair's
GEMMs run with fixed tile shapes whatever the number of rows, and a token's top-k outputs are summed
in rank order, one rounding each.

Routing (Qwen3-MoE, Qwen3.5-MoE): p = softmax(x Wr^T) in float32, the top-k of p, renormalised to
sum to 1 when the config says so, cast to the activations' dtype. Experts: y = sum_j w_j ·
down_e(silu(gate_e x) ⊙ up_e x), with gate_up [E, 2I, H] (gate rows first) and down [E, H, I].

gpt-oss (research/moe-gptoss.md §2.4) differs in four ways, each a switch: the router has a bias and
takes the softmax over the top-k logits only (`softmax_after_topk`); gate and up rows are interleaved
(row 2j = gate_j, 2j+1 = up_j) and the activation is the clamped SwiGLU (up + 1) · g · sigmoid(α g)
with g = min(gate, limit), up clamped to ±limit (`swiglu_limit`); both projections have per-expert
biases, inside the routing weight: w_j · (down_e(a) + b_e); and the weights may stay MXFP4-packed
(`*_scales` given): `*_blocks` [E, rows, K/32, 16] u8 hold two e2m1 values per byte (low nibble
first), each group of 32 scaled by 2^(scale - 127) (an e8m0 byte). The kernels dequantise as they
stream; the reference dequantises the experts it gathers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ROWS = 16  # rows per piece of the reference router (bounds its [rows, E, H] product)


def router_logits_ref(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] float32: each row's dot products with the router rows, reduced over H alone (+ the bias)."""
    out = [(x[i:i + _ROWS, None, :].float() * router[None].float()).sum(-1) for i in range(0, x.shape[0], _ROWS)]
    logits = torch.cat(out) if out else x.new_zeros((0, router.shape[0]), dtype=torch.float32)
    return logits if bias is None else logits + bias.float()


def route_from_logits(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype,
                      softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k] int64, weights [T, k] in `dtype`) from router logits, per row."""
    if softmax_after_topk:  # gpt-oss: the top-k of the logits as transformers rounds them, softmax over those k
        values, idx = torch.topk(logits.to(dtype), top_k, dim=-1)
        return idx, values.float().softmax(-1).to(dtype)
    probs = logits.to(dtype).float().softmax(-1)  # logits rounded as transformers computes them, then fp32
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights.to(dtype)


def route_ref(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool, bias: torch.Tensor | None = None,
              softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return route_from_logits(router_logits_ref(x, router, bias), top_k, renormalize, x.dtype, softmax_after_topk)


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by nibble


def e2m1_values(nibbles: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles (sign, 2-bit exponent, 1-bit mantissa) → float32, computed on the device: a lookup
    table made from E2M1 here would be a host-to-device copy, which a CUDA graph capture refuses (the
    reference runs captured on the tests' stand-in GPU). Exact: E2M1[n] for every n (a test checks)."""
    exponent, mantissa = ((nibbles >> 1) & 3).float(), (nibbles & 1).float()
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, (1 + 0.5 * mantissa) * torch.exp2(exponent - 1))
    return torch.where((nibbles & 8) != 0, -magnitude, magnitude)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 → dense: blocks [..., G, 16] u8 and scales [..., G] u8 → [..., G·32] in `dtype` (exact:
    every value is a 2-bit mantissa times a power of two)."""
    values = torch.stack((e2m1_values(blocks & 15), e2m1_values(blocks >> 4)), dim=-1).flatten(-2)  # low nibble first: [..., G, 32]
    values = torch.ldexp(values, scales.int()[..., None] - 127)
    return values.flatten(-2).to(dtype)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's activation, op by op in the activations' dtype as transformers computes it."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, *, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, gate_up_scales: torch.Tensor | None = None,
                down_scales: torch.Tensor | None = None, swiglu_limit: float | None = None,
                swiglu_alpha: float = 1.702, shared: torch.Tensor | None = None,
                shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: y [T, H] = sum over each token's k experts, in rank order, of w · down(silu(g) ⊙ u)
    (gpt-oss: w · (down(clamped SwiGLU) + b)), plus, given `shared` [T, H] and `shared_gate` [T, 1],
    Qwen3.5-MoE's gated shared expert (`add_shared`). Every (token, expert) pair is its own
    matrix-vector product (a batched GEMM of one row each)."""
    t, k = idx.shape
    pairs = idx.reshape(-1)
    rows = x.repeat_interleave(k, dim=0)  # pair p = (token p // k, rank p % k)
    w_gu, w_dn = gate_up[pairs], down[pairs]
    if gate_up_scales is not None:  # packed: dequantise only the experts the pairs touch
        w_gu = dequantize_mxfp4(w_gu, gate_up_scales[pairs], x.dtype)
        w_dn = dequantize_mxfp4(w_dn, down_scales[pairs], x.dtype)
    gu = torch.bmm(w_gu, rows[:, :, None])[..., 0]
    if gate_up_bias is not None:
        gu = gu + gate_up_bias[pairs]
    if swiglu_limit is None:
        gate, up = gu.chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)
    else:  # interleaved rows: gate_j at 2j, up_j at 2j + 1
        act = clamped_swiglu(gu[:, 0::2], gu[:, 1::2], swiglu_limit, swiglu_alpha).to(x.dtype)
    out = torch.bmm(w_dn, act[:, :, None])[..., 0]
    if down_bias is not None:
        out = out + down_bias[pairs]
    out = out * weights.reshape(-1, 1)
    out = out.view(t, k, -1)
    y = out[:, 0]
    for j in range(1, k):  # rank order, one rounding per term: no reduction across the k terms
        y = y + out[:, j]
    return add_shared(y.to(x.dtype), shared, shared_gate)


def add_shared(y: torch.Tensor, shared: torch.Tensor | None, shared_gate: torch.Tensor | None) -> torch.Tensor:
    """The routed experts' y plus the shared expert weighted by sigmoid of its gate, op by op in y's dtype
    (as Qwen3.5-MoE's layer adds it)."""
    return y if shared is None else y + torch.sigmoid(shared_gate) * shared


def experts_by_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
                      weights: torch.Tensor, *, gate_up_bias: torch.Tensor | None = None,
                      down_bias: torch.Tensor | None = None, gate_up_scales: torch.Tensor | None = None,
                      down_scales: torch.Tensor | None = None, swiglu_limit: float | None = None,
                      swiglu_alpha: float = 1.702, shared: torch.Tensor | None = None,
                      shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """A long prefill chunk (more than 32 tokens): each touched expert once, all its rows in one GEMM,
    its weights (gpt-oss: dequantised) once. The reference's per-pair copies of the weights would take T·k experts' worth
    of memory (tens of GB at 512 tokens). Eager: it reads the touched experts back to the host, and
    rows are not batch-invariant here (prefill rows are computed once; decode and verify never come here)."""
    t, k = idx.shape
    out = torch.zeros((t, k, down.shape[1]), dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        rows, ranks = (idx == e).nonzero(as_tuple=True)
        w_gu, w_dn = gate_up[e], down[e]
        if gate_up_scales is not None:
            w_gu = dequantize_mxfp4(w_gu, gate_up_scales[e], x.dtype)
            w_dn = dequantize_mxfp4(w_dn, down_scales[e], x.dtype)
        gu = F.linear(x[rows], w_gu, None if gate_up_bias is None else gate_up_bias[e])
        if swiglu_limit is None:
            gate, up = gu.chunk(2, dim=-1)
            act = (F.silu(gate) * up).to(x.dtype)
        else:
            act = clamped_swiglu(gu[:, 0::2], gu[:, 1::2], swiglu_limit, swiglu_alpha).to(x.dtype)
        y = F.linear(act, w_dn, None if down_bias is None else down_bias[e])
        out[rows, ranks] = (y * weights[rows, ranks, None]).float()
    y = out[:, 0]
    for j in range(1, k):
        y = y + out[:, j]
    return add_shared(y.to(x.dtype), shared, shared_gate)


# ---- Triton ------------------------------------------------------------------------------------------
# Launches none of which reduces across rows (three per layer whatever T and k):
#  1. `_route_kernel`, grid (T, expert blocks): each row's logits, its H reduced in BLOCK_H chunks in order,
#     stored; the last program of the row to take its ticket (a per-row counter, reset after) runs the
#     row's softmax, top-k and renormalisation over them (`_router_kernel` then `_top_k_kernel`, as two
#     launches with the same bits: route(launches=2)).
#  2. `_gate_up_kernel`, grid (slots, I blocks), aligns the (token, expert) pairs itself: slot s is the
#     s-th touched expert in ascending id (unused slots: expert -1), its rows that expert's pairs in pair
#     order (at most T <= 32: one M-block of BLOCK_M rows), what a stable sort by expert gives; every
#     program finds its own from the T·k ids (integer counts: exact, no atomics), and program (s, 0)
#     writes slot s's row of a table for the down kernel. The program streams its expert's gate and up
#     rows once for all of its tokens and writes silu(g)·u per pair; `_down_kernel`, grid (slots, H
#     blocks), does the down projection times the routing weight. BLOCK_M is fixed, so a row's tile
#     products are the same instructions whether its expert has 1 row or 32.
#  3. The combine, in `_down_kernel`'s epilogue: each program takes a ticket on the counter of each
#     (token, H block) among its rows; the last of a token's k expert programs sums the token's k outputs
#     in rank order (one rounding per term, no reduction whose tree could follow T), then (Qwen3.5-MoE)
#     adds the gated shared expert, rounded op by op as the torch expression y + sigmoid(g) · s, and
#     resets the counter. `experts(launches=3)` runs it as its own launch (`_combine_kernel`, grid (T, H
#     blocks)), the same bits.
# More than BLOCK_M tokens (a long prefill chunk) go to `experts_by_expert`, which never copies an
# expert's weights per pair as the reference does.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .invariant_linear import tickets  # noqa: E402  (the per-device zeroed counters: one per row here)

_BLOCK_M = 32  # rows per expert slot: every T <= 32 fits one slot per touched expert
_BLOCK_Q = 32  # pair ids compared per step of the alignment
_UPCAST = __import__("os").environ.get("TRITON_INTERPRET") == "1"  # the interpreter mis-computes bf16 tl.dot


@triton.jit
def _router_logits(x_ptr, w_ptr, b_ptr, row, experts, n_experts, hidden, BLOCK_E: tl.constexpr,
                   BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row `row`'s logits for the experts `experts` [BLOCK_E], H reduced in BLOCK_H chunks in order."""
    acc = tl.zeros([BLOCK_E], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + row * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + experts[:, None].to(tl.int64) * hidden + cols[None, :],
                    mask=(experts[:, None] < n_experts) & (cols[None, :] < hidden), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + experts, mask=experts < n_experts, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_experts, hidden, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = _router_logits(x_ptr, w_ptr, b_ptr, row, experts, n_experts, hidden, BLOCK_E, BLOCK_H, HAS_BIAS)
    tl.store(out_ptr + row * n_experts + experts, acc, mask=experts < n_experts)


@triton.jit
def _top_k_kernel(logits_ptr, idx_ptr, w_ptr, n_experts, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, SOFTMAX_AFTER_TOPK: tl.constexpr):
    _top_k(logits_ptr, idx_ptr, w_ptr, tl.program_id(0).to(tl.int64), n_experts, TOP_K, BLOCK_E, BLOCK_K,
           RENORMALIZE, SOFTMAX_AFTER_TOPK)


@triton.jit
def _top_k(logits_ptr, idx_ptr, w_ptr, row, n_experts, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
           BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, SOFTMAX_AFTER_TOPK: tl.constexpr):
    """One row of `route_from_logits`: the softmax, the top-k (ties: the lowest expert id) and the
    renormalisation, in one program, so a row's weights never depend on how many rows share the launch.
    The logits are read past L1 (.cg): in `_route_kernel` other programs wrote them."""
    experts = tl.arange(0, BLOCK_E)
    ok = experts < n_experts
    dt = w_ptr.dtype.element_ty
    logits = tl.load(logits_ptr + row * n_experts + experts, mask=ok, other=0.0, cache_modifier=".cg")
    scores = tl.where(ok, logits.to(dt).to(tl.float32), float("-inf"))  # rounded as transformers computes them
    if not SOFTMAX_AFTER_TOPK:
        e = tl.exp(scores - tl.max(scores, axis=0))
        scores = tl.where(ok, e / tl.sum(e, axis=0), float("-inf"))
    ranks = tl.arange(0, BLOCK_K)
    top_v = tl.zeros([BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_K], tl.int64)
    for j in tl.static_range(TOP_K):  # rank j: the largest score left, the lowest id among equals
        best = tl.max(scores, axis=0)
        pick = tl.min(tl.where(scores == best, experts, BLOCK_E), axis=0)
        top_v = tl.where(ranks == j, best, top_v)
        top_i = tl.where(ranks == j, pick.to(tl.int64), top_i)
        scores = tl.where(experts == pick, float("-inf"), scores)
    used = ranks < TOP_K
    if SOFTMAX_AFTER_TOPK:  # gpt-oss: softmax over the k logits
        e = tl.where(used, tl.exp(top_v - tl.max(tl.where(used, top_v, float("-inf")), axis=0)), 0.0)
        top_v = e / tl.sum(e, axis=0)
    elif RENORMALIZE:
        top_v = top_v / tl.sum(tl.where(used, top_v, 0.0), axis=0)
    tl.store(idx_ptr + row * TOP_K + ranks, top_i, mask=used)
    tl.store(w_ptr + row * TOP_K + ranks, top_v.to(dt), mask=used)


@triton.jit
def _route_kernel(x_ptr, w_ptr, b_ptr, logits_ptr, idx_ptr, weight_ptr, tickets_ptr, n_experts, hidden,
                  n_blocks, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_ALL: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORMALIZE: tl.constexpr, SOFTMAX_AFTER_TOPK: tl.constexpr):
    """`_router_kernel` then `_top_k_kernel` in one launch: program (row, block) stores its block of the
    row's logits and takes a ticket on the row's counter; the last of the row's n_blocks programs runs
    the top-k over the stored logits (the same loads and instructions as `_top_k_kernel`) and puts the
    counter back to 0 (for the next launch and a graph's next replay)."""
    row = tl.program_id(0).to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = _router_logits(x_ptr, w_ptr, b_ptr, row, experts, n_experts, hidden, BLOCK_E, BLOCK_H, HAS_BIAS)
    tl.store(logits_ptr + row * n_experts + experts, acc, mask=experts < n_experts)
    tl.debug_barrier()  # every thread's logits are stored before the ticket's release publishes them
    counter = tickets_ptr + row
    if tl.atomic_add(counter, 1, sem="acq_rel") == n_blocks - 1:
        _top_k(logits_ptr, idx_ptr, weight_ptr, row, n_experts, TOP_K, BLOCK_ALL, BLOCK_K, RENORMALIZE,
               SOFTMAX_AFTER_TOPK)
        tl.atomic_xchg(counter, 0)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool, bias: torch.Tensor | None = None,
          softmax_after_topk: bool = False, launches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: same contract as `route_ref` (weights within rounding of its softmax; the same experts
    but where two scores tie, which the kernel breaks to the lowest id). One launch (`_route_kernel`);
    `launches=2`: the router and the top-k as two, the same bits (kept to test that)."""
    assert launches in (1, 2), launches
    t, h = x.shape
    e = router.shape[0]
    logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
    idx = torch.empty((t, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((t, top_k), dtype=x.dtype, device=x.device)
    if t:
        block_e = min(64, triton.next_power_of_2(e))
        grid = (t, triton.cdiv(e, block_e))
        top = dict(TOP_K=top_k, BLOCK_K=max(2, triton.next_power_of_2(top_k)), RENORMALIZE=renormalize,
                   SOFTMAX_AFTER_TOPK=softmax_after_topk)
        x, b = x.contiguous(), router if bias is None else bias
        if launches == 1:
            _route_kernel[grid](x, router, b, logits, idx, weights, tickets(x.device, t), e, h, grid[1],
                                BLOCK_E=block_e, BLOCK_H=min(128, triton.next_power_of_2(h)),
                                BLOCK_ALL=triton.next_power_of_2(e), HAS_BIAS=bias is not None, **top)
        else:
            _router_kernel[grid](x, router, b, logits, e, h, BLOCK_E=block_e,
                                 BLOCK_H=min(128, triton.next_power_of_2(h)), HAS_BIAS=bias is not None)
            _top_k_kernel[(t,)](logits, idx, weights, e, BLOCK_E=triton.next_power_of_2(e), **top)
    return idx, weights


def align_ref(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot table the expert kernels build: per slot its expert (-1: unused) and its pairs in pair order
    ([n_slots, BLOCK_M], -1 past the count), slot s being the s-th touched expert in ascending id (a stable
    sort of the T·k ids by expert). Host code: the tests' reference for `_align`."""
    pairs = idx.reshape(-1).tolist()
    n_slots = min(len(pairs), n_experts)
    expert = torch.full((n_slots,), -1, dtype=torch.int32)
    rows = torch.full((n_slots, _BLOCK_M), -1, dtype=torch.int32)
    for s, e in enumerate(sorted(set(pairs))):
        members = [p for p, pe in enumerate(pairs) if pe == e]
        expert[s] = e
        rows[s, :len(members)] = torch.tensor(members, dtype=torch.int32)
    return expert, rows


@triton.jit
def _align(idx_ptr, n_pairs, n_experts, s, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
           BLOCK_M: tl.constexpr):
    """Slot s of the pairs' alignment: its expert (-1: fewer touched experts than s + 1) and its rows, the
    pair ids of that expert in ascending order ([BLOCK_M], -1 past its count). Integer counts over the
    T·k ids, the same in every program that asks."""
    experts = tl.arange(0, BLOCK_E)
    present = tl.zeros([BLOCK_E], tl.int32)
    for q0 in range(0, BLOCK_P, BLOCK_Q):  # which experts any pair routes to
        q = q0 + tl.arange(0, BLOCK_Q)
        e_q = tl.load(idx_ptr + q, mask=q < n_pairs, other=-1).to(tl.int32)
        present = tl.maximum(present, tl.max((experts[:, None] == e_q[None, :]).to(tl.int32), axis=1))
    rank = tl.cumsum(present, axis=0) - 1  # a touched expert's slot
    expert = tl.max(tl.where((present > 0) & (rank == s), experts, -1), axis=0)
    p = tl.arange(0, BLOCK_P)
    mine = (tl.load(idx_ptr + p, mask=p < n_pairs, other=-1).to(tl.int32) == expert) & (expert >= 0)
    row_of = tl.cumsum(mine.to(tl.int32), axis=0) - 1  # a pair's row in its slot: pair order
    r = tl.arange(0, BLOCK_M)
    rows = tl.max(tl.where(mine[None, :] & (row_of[None, :] == r[:, None]), p[None, :], -1), axis=1)
    return expert, rows


@triton.jit
def _align_kernel(idx_ptr, slot_expert_ptr, slot_rows_ptr, n_pairs, n_experts, BLOCK_E: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    s = tl.program_id(0)
    expert, rows = _align(idx_ptr, n_pairs, n_experts, s, BLOCK_E, BLOCK_P, BLOCK_Q, BLOCK_M)
    tl.store(slot_expert_ptr + s, expert)
    tl.store(slot_rows_ptr + s * BLOCK_M + tl.arange(0, BLOCK_M), rows)


def align(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: the slot table of `align_ref`, as `_gate_up_kernel` builds it (`_align`); for the tests (the
    engine's path aligns inside the gate_up launch)."""
    n_slots = min(idx.numel(), n_experts)
    expert = torch.empty(n_slots, dtype=torch.int32, device=idx.device)
    rows = torch.empty((n_slots, _BLOCK_M), dtype=torch.int32, device=idx.device)
    _align_kernel[(n_slots,)](idx.contiguous(), expert, rows, idx.numel(), n_experts,
                              BLOCK_E=triton.next_power_of_2(n_experts),
                              BLOCK_P=max(_BLOCK_Q, triton.next_power_of_2(idx.numel())), BLOCK_Q=_BLOCK_Q,
                              BLOCK_M=_BLOCK_M)
    return expert, rows


@triton.jit
def _e2m1(nib):
    """fp32 values of e2m1 nibbles (uint32 0..15): sign bit 3, exponent bits 2..1, mantissa bit 0."""
    e = (nib >> 1) & 3
    m = nib & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))  # 0, 0.5 | (1 + m/2)·2^(e-1)
    return (bits | ((nib & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_tile(b_base, s_base, rows, n_ok, kb, kb_ok, row_bytes, DTYPE: tl.constexpr):
    """Weight rows `rows` of one expert at bytes `kb` of each row, dequantised: ([len(kb), len(rows)] of
    the low nibbles (the even inputs 2·kb), same of the high nibbles (the odd ones)), in DTYPE, exact."""
    mask = n_ok[None, :] & kb_ok[:, None]
    byte = tl.load(b_base + rows[None, :].to(tl.int64) * row_bytes + kb[:, None], mask=mask, other=0).to(tl.uint32)
    s = tl.load(s_base + rows[None, :].to(tl.int64) * (row_bytes // 16) + (kb // 16)[:, None], mask=mask,
                other=127).to(tl.uint32)
    scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)  # e8m0: 2^(s - 127)
    return (_e2m1(byte & 15) * scale).to(DTYPE), (_e2m1(byte >> 4) * scale).to(DTYPE)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, idx_ptr, slot_expert_ptr, slot_rows_ptr, n_pairs, top_k, n_experts,
                    hidden, inter, s_ptr, b_ptr, limit, alpha, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                    CLAMPED: tl.constexpr):
    s = tl.program_id(0)
    expert, rows = _align(idx_ptr, n_pairs, n_experts, s, BLOCK_E, BLOCK_P, BLOCK_Q, BLOCK_M)
    if tl.program_id(1) == 0:  # slot s's row of the table, for the down kernel
        tl.store(slot_expert_ptr + s, expert)
        tl.store(slot_rows_ptr + s * BLOCK_M + tl.arange(0, BLOCK_M), rows)
    if expert >= 0:
        ok = rows >= 0
        pair = tl.where(ok, rows, 0)
        token = pair // top_k
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        if CLAMPED:  # gpt-oss: gate_j and up_j are rows 2j and 2j + 1
            g_rows, u_rows = 2 * n, 2 * n + 1
        else:
            g_rows, u_rows = n, inter + n
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if MXFP4:
            dt_x = x_ptr.dtype.element_ty
            b_rows = w_ptr + expert * 2 * inter * (hidden // 2)
            s_rows = s_ptr + expert * 2 * inter * (hidden // 32)
            for k0 in range(0, hidden, BLOCK_K):
                # Each byte holds inputs 2i (low nibble) and 2i + 1: the even and odd columns of x meet the
                # low and high nibbles in two dots, so the weights are never interleaved in registers.
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                kb_ok = kb < hidden // 2
                x_at = x_ptr + token[:, None].to(tl.int64) * hidden + 2 * kb[None, :]
                x_even = tl.load(x_at, mask=ok[:, None] & kb_ok[None, :], other=0.0)
                x_odd = tl.load(x_at + 1, mask=ok[:, None] & kb_ok[None, :], other=0.0)
                g_lo, g_hi = _mxfp4_tile(b_rows, s_rows, g_rows, n_ok, kb, kb_ok, hidden // 2, dt_x)
                u_lo, u_hi = _mxfp4_tile(b_rows, s_rows, u_rows, n_ok, kb, kb_ok, hidden // 2, dt_x)
                if UPCAST:
                    x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                    g_lo, g_hi, u_lo, u_hi = g_lo.to(tl.float32), g_hi.to(tl.float32), u_lo.to(tl.float32), \
                        u_hi.to(tl.float32)
                acc_g = tl.dot(x_even, g_lo, acc_g, input_precision=PRECISION)
                acc_g = tl.dot(x_odd, g_hi, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(x_even, u_lo, acc_u, input_precision=PRECISION)
                acc_u = tl.dot(x_odd, u_hi, acc_u, input_precision=PRECISION)
        else:
            w_rows = w_ptr + expert * 2 * inter * hidden
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < hidden
                x = tl.load(x_ptr + token[:, None].to(tl.int64) * hidden + k[None, :],
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                wg = tl.load(w_rows + g_rows[None, :].to(tl.int64) * hidden + k[:, None],
                             mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                wu = tl.load(w_rows + u_rows[None, :].to(tl.int64) * hidden + k[:, None],
                             mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        dt = act_ptr.dtype.element_ty
        gate = acc_g.to(dt).to(tl.float32)  # rounded where the reference's GEMM output is
        up = acc_u.to(dt).to(tl.float32)
        if HAS_BIAS:
            bias = b_ptr + expert * 2 * inter
            gate = (gate + tl.load(bias + g_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
            up = (up + tl.load(bias + u_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        if CLAMPED:  # (up + 1) · g · sigmoid(α g), g = min(gate, limit), up in ±limit; rounded op by op as torch
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            sig = (1.0 / (1.0 + tl.exp(-(gate * alpha).to(dt).to(tl.float32)))).to(dt).to(tl.float32)
            act = (up + 1.0).to(dt).to(tl.float32) * (gate * sig).to(dt).to(tl.float32)
        else:
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
        tl.store(act_ptr + pair[:, None].to(tl.int64) * inter + n[None, :], act.to(dt), mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, weight_ptr, out_ptr, slot_expert_ptr, slot_rows_ptr,
                 hidden, inter, s_ptr, b_ptr, y_ptr, shared_ptr, gate_ptr, tickets_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                 TOP_K: tl.constexpr = 1, SHARED: tl.constexpr = False, FOLD: tl.constexpr = False):
    """Slot s's pairs times the down projection, times their routing weights, into out [T·k, H] (fp32). With
    FOLD the combine is this launch's epilogue: each program takes a ticket on the counter of every (token,
    H block) among its rows; a token's k expert programs each take one, and the last to arrive sums the
    token's k outputs in rank order as `_combine_kernel` does (the same loads and roundings, element by
    element) and resets the counter."""
    s = tl.program_id(0)
    expert = tl.load(slot_expert_ptr + s)
    if expert >= 0:
        rows = tl.load(slot_rows_ptr + s * BLOCK_M + tl.arange(0, BLOCK_M))
        ok = rows >= 0
        pair = tl.where(ok, rows, 0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dt = act_ptr.dtype.element_ty
        if MXFP4:
            b_rows = w_ptr + expert * hidden * (inter // 2)
            s_rows = s_ptr + expert * hidden * (inter // 32)
            for k0 in range(0, inter, BLOCK_K):
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                kb_ok = kb < inter // 2
                a_at = act_ptr + pair[:, None].to(tl.int64) * inter + 2 * kb[None, :]
                a_even = tl.load(a_at, mask=ok[:, None] & kb_ok[None, :], other=0.0)
                a_odd = tl.load(a_at + 1, mask=ok[:, None] & kb_ok[None, :], other=0.0)
                w_lo, w_hi = _mxfp4_tile(b_rows, s_rows, n, n_ok, kb, kb_ok, inter // 2, dt)
                if UPCAST:
                    a_even, a_odd, w_lo, w_hi = a_even.to(tl.float32), a_odd.to(tl.float32), w_lo.to(tl.float32), \
                        w_hi.to(tl.float32)
                acc = tl.dot(a_even, w_lo, acc, input_precision=PRECISION)
                acc = tl.dot(a_odd, w_hi, acc, input_precision=PRECISION)
        else:
            w_rows = w_ptr + expert * hidden * inter
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < inter
                a = tl.load(act_ptr + pair[:, None].to(tl.int64) * inter + k[None, :],
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + n[None, :].to(tl.int64) * inter + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                            other=0.0)
                if UPCAST:
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
        scale = tl.load(weight_ptr + pair, mask=ok, other=0.0).to(tl.float32)
        out = acc.to(dt).to(tl.float32)
        if HAS_BIAS:  # inside the routing weight, as transformers' gpt-oss
            bias = tl.load(b_ptr + expert * hidden + n, mask=n_ok, other=0.0).to(tl.float32)
            out = (out + bias[None, :]).to(dt).to(tl.float32)
        out = out * scale[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :], out, mask=ok[:, None] & n_ok[None, :])
        if FOLD:
            token = pair // TOP_K
            counters = tickets_ptr + token * tl.num_programs(1) + tl.program_id(1)
            tl.debug_barrier()  # every thread's outputs are stored before the tickets' release publishes them
            last = (tl.atomic_add(counters, 1, mask=ok, sem="acq_rel") == TOP_K - 1) & ok
            tl.debug_barrier()
            _combine_tile(out_ptr, y_ptr, shared_ptr, gate_ptr, token.to(tl.int64), n, last, n_ok, hidden, TOP_K,
                          SHARED)
            tl.atomic_xchg(counters, 0, mask=last)  # ready for the next launch (and a graph's next replay)


@triton.jit
def _combine_tile(out_ptr, y_ptr, shared_ptr, gate_ptr, t, cols, rows_ok, cols_ok, hidden, TOP_K: tl.constexpr,
                  SHARED: tl.constexpr):
    """`_combine_kernel`'s body on the tokens t [R] (where rows_ok) and columns cols [C]: element by element,
    so the same bits whatever the tile (the outputs read past L1: other programs wrote them)."""
    ok = rows_ok[:, None] & cols_ok[None, :]
    y = tl.load(out_ptr + (t * TOP_K * hidden)[:, None] + cols[None, :], mask=ok, other=0.0, cache_modifier=".cg")
    for j in tl.static_range(1, TOP_K):
        y = y + tl.load(out_ptr + ((t * TOP_K + j) * hidden)[:, None] + cols[None, :], mask=ok, other=0.0,
                        cache_modifier=".cg")
    dt = y_ptr.dtype.element_ty
    y = y.to(dt)
    if SHARED:
        g = tl.load(gate_ptr + t, mask=rows_ok, other=0.0).to(tl.float32)
        sig = (1.0 / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        shared = tl.load(shared_ptr + (t * hidden)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + (sig[:, None] * shared).to(dt).to(tl.float32)).to(dt)
    tl.store(y_ptr + (t * hidden)[:, None] + cols[None, :], y, mask=ok)


@triton.jit
def _combine_kernel(out_ptr, y_ptr, shared_ptr, gate_ptr, hidden, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                    SHARED: tl.constexpr):
    """Token t's k weighted expert outputs (fp32, rank order) summed one rounding per term, rounded once to
    y's dtype; with SHARED, y + sigmoid(g_t) · shared_t rounded as torch rounds each op in y's dtype."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hidden
    y = tl.load(out_ptr + t * TOP_K * hidden + cols, mask=ok, other=0.0)
    for j in tl.static_range(1, TOP_K):
        y = y + tl.load(out_ptr + (t * TOP_K + j) * hidden + cols, mask=ok, other=0.0)
    dt = y_ptr.dtype.element_ty
    y = y.to(dt)
    if SHARED:
        g = tl.load(gate_ptr + t).to(tl.float32)
        sig = (1.0 / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        shared = tl.load(shared_ptr + t * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + (sig * shared).to(dt).to(tl.float32)).to(dt)
    tl.store(y_ptr + t * hidden + cols, y, mask=ok)


def experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
            weights: torch.Tensor, *, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
            gate_up_scales: torch.Tensor | None = None, down_scales: torch.Tensor | None = None,
            swiglu_limit: float | None = None, swiglu_alpha: float = 1.702, shared: torch.Tensor | None = None,
            shared_gate: torch.Tensor | None = None, launches: int = 2) -> torch.Tensor:
    """Triton: same contract as `experts_ref`, for up to 32 tokens (a prefill chunk of more goes expert
    by expert, which syncs: it runs once, eagerly). Two launches (the combine in the down projection's
    epilogue); `launches=3`: the combine as its own launch, the same bits (kept to test that)."""
    assert launches in (2, 3), launches
    t, k = idx.shape
    kw = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, gate_up_scales=gate_up_scales, down_scales=down_scales,
              swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, shared=shared, shared_gate=shared_gate)
    if t > _BLOCK_M:
        return experts_by_expert(x, gate_up, down, idx, weights, **kw)
    mxfp4 = gate_up_scales is not None
    n_experts, two_i = gate_up.shape[:2]
    hidden = gate_up.shape[2] * 32 if mxfp4 else gate_up.shape[2]
    inter = two_i // 2
    x = x.contiguous()
    n_slots = min(t * k, n_experts)
    slot_expert = torch.empty(n_slots, dtype=torch.int32, device=x.device)
    slot_rows = torch.empty((n_slots, _BLOCK_M), dtype=torch.int32, device=x.device)
    act = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((t * k, hidden), dtype=torch.float32, device=x.device)
    y = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    flags = dict(UPCAST=_UPCAST, PRECISION=precision, MXFP4=mxfp4)
    # MXFP4 groups are 32 inputs: a K-step covers whole groups, and each of its two dots gets >= 16 of K.
    least_k = 32 if mxfp4 else 16
    block_k = min(64, max(least_k, triton.next_power_of_2(hidden)))
    block_n = min(64, max(16, triton.next_power_of_2(inter)))
    _gate_up_kernel[(n_slots, triton.cdiv(inter, block_n))](
        x, gate_up, act, idx.contiguous(), slot_expert, slot_rows, t * k, k, n_experts, hidden, inter,
        gate_up_scales if mxfp4 else gate_up, gate_up if gate_up_bias is None else gate_up_bias,
        float(swiglu_limit or 0.0), float(swiglu_alpha), BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_P=max(_BLOCK_Q, triton.next_power_of_2(t * k)),
        BLOCK_Q=_BLOCK_Q, HAS_BIAS=gate_up_bias is not None, CLAMPED=swiglu_limit is not None, **flags)
    block_n = min(64, max(16, triton.next_power_of_2(hidden)))
    block_k = min(64, max(least_k, triton.next_power_of_2(inter)))
    has_shared = shared is not None
    shared_args = (shared.contiguous() if has_shared else y, shared_gate.contiguous() if has_shared else y)
    h_blocks = triton.cdiv(hidden, block_n)
    # counters for every (token, H block) of a full slot: one size per weight, allocated on the first call
    # (a warm-up, before any capture)
    counters = tickets(x.device, _BLOCK_M * h_blocks)
    _down_kernel[(n_slots, h_blocks)](
        act, down, weights.reshape(-1).contiguous(), out, slot_expert, slot_rows, hidden, inter,
        down_scales if mxfp4 else down, down if down_bias is None else down_bias, y, *shared_args, counters,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=down_bias is not None, TOP_K=k,
        SHARED=has_shared, FOLD=launches == 2, **flags)
    if launches == 2:
        return y
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(t, triton.cdiv(hidden, block_h))](out, y, *shared_args, hidden, TOP_K=k, BLOCK_H=block_h,
                                                       SHARED=has_shared)
    return y
