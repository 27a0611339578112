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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ROWS = 16  # rows per piece of the reference router (bounds its [rows, E, H] product)


def router_logits_ref(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """[T, E] float32: each row's dot products with the router rows, reduced over H alone."""
    out = [(x[i:i + _ROWS, None, :].float() * router[None].float()).sum(-1) for i in range(0, x.shape[0], _ROWS)]
    return torch.cat(out) if out else x.new_zeros((0, router.shape[0]), dtype=torch.float32)


def route_from_logits(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k] int64, weights [T, k] in `dtype`) from router logits, per row."""
    probs = logits.to(dtype).float().softmax(-1)  # logits rounded as transformers computes them, then fp32
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return idx, weights.to(dtype)


def route_ref(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return route_from_logits(router_logits_ref(x, router), top_k, renormalize, x.dtype)


def experts_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """Reference: y [T, H] = sum over each token's k experts, in rank order, of w · down(silu(g) ⊙ u).
    Every (token, expert) pair is its own matrix-vector product (a batched GEMM of one row each)."""
    t, k = idx.shape
    pairs = idx.reshape(-1)
    rows = x.repeat_interleave(k, dim=0)  # pair p = (token p // k, rank p % k)
    gu = torch.bmm(gate_up[pairs], rows[:, :, None])[..., 0]
    gate, up = gu.chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(x.dtype)
    out = torch.bmm(down[pairs], act[:, :, None])[..., 0] * weights.reshape(-1, 1)
    out = out.view(t, k, -1)
    y = out[:, 0]
    for j in range(1, k):  # rank order, one rounding per term: no reduction across the k terms
        y = y + out[:, j]
    return y.to(x.dtype)


# ---- Triton ------------------------------------------------------------------------------------------
# Three launches, none of which reduces across rows:
#  1. `_router_kernel`, grid (T, expert blocks): each row's logits, its H reduced in BLOCK_H chunks in order.
#  2. The (token, expert) pairs are sorted by expert on the device (a stable sort of T·k ids: fixed
#     shape, no host read) into "slots": slot s holds the rows of one touched expert (at most T ≤ 32 of
#     them, so one M-block of BLOCK_M rows); unused slots have expert -1. `_gate_up_kernel`, grid
#     (slots, I blocks), streams its expert's gate and up rows once for all of its tokens and writes
#     silu(g)·u per pair; `_down_kernel`, grid (slots, H blocks), does the down projection times the
#     routing weight. BLOCK_M is fixed, so a row's tile products are the same instructions whether its
#     expert has 1 row or 32.
#  3. The k outputs of each token are summed in rank order (torch ops on [T, k, H], per row).
# More than BLOCK_M rows for one expert (a long prefill chunk) fall back to the reference.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_BLOCK_M = 32  # rows per expert slot: every T <= 32 fits one slot per touched expert
_UPCAST = __import__("os").environ.get("TRITON_INTERPRET") == "1"  # the interpreter mis-computes bf16 tl.dot


@triton.jit
def _router_kernel(x_ptr, w_ptr, out_ptr, n_experts, hidden, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + row * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + experts[:, None].to(tl.int64) * hidden + cols[None, :],
                    mask=(experts[:, None] < n_experts) & (cols[None, :] < hidden), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + row * n_experts + experts, acc, mask=experts < n_experts)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: same contract as `route_ref`."""
    t, h = x.shape
    e = router.shape[0]
    logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
    if t:
        block_e = min(64, triton.next_power_of_2(e))
        _router_kernel[(t, triton.cdiv(e, block_e))](x.contiguous(), router, logits, e, h, BLOCK_E=block_e,
                                                     BLOCK_H=min(128, triton.next_power_of_2(h)))
    return route_from_logits(logits, top_k, renormalize, x.dtype)


def _slots(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs sorted by expert, and per slot its expert (-1: unused), first sorted pair and count.
    All device ops with fixed shapes."""
    pairs = idx.reshape(-1)
    p = pairs.numel()
    n_slots = min(p, n_experts)
    sorted_experts, order = torch.sort(pairs, stable=True)
    starts = torch.ones(p, dtype=torch.bool, device=idx.device)
    starts[1:] = sorted_experts[1:] != sorted_experts[:-1]
    slot_of = starts.long().cumsum(0) - 1
    slot_expert = torch.full((n_slots,), -1, dtype=torch.int64, device=idx.device).scatter(0, slot_of, sorted_experts)
    slot_start = torch.full((n_slots,), p, dtype=torch.int64, device=idx.device).scatter_reduce(
        0, slot_of, torch.arange(p, device=idx.device), "amin")
    slot_count = torch.zeros(n_slots, dtype=torch.int64, device=idx.device).scatter_add(0, slot_of, torch.ones_like(pairs))
    return order, slot_expert, slot_start, slot_count


@triton.jit
def _slot_rows(order_ptr, slot_start_ptr, slot_count_ptr, s, BLOCK_M: tl.constexpr):
    r = tl.arange(0, BLOCK_M)
    count = tl.load(slot_count_ptr + s)
    ok = r < count
    pair = tl.load(order_ptr + tl.load(slot_start_ptr + s) + r, mask=ok, other=0)
    return pair, ok


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, order_ptr, slot_expert_ptr, slot_start_ptr, slot_count_ptr, top_k,
                    hidden, inter, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.program_id(0)
    expert = tl.load(slot_expert_ptr + s)
    if expert >= 0:
        pair, ok = _slot_rows(order_ptr, slot_start_ptr, slot_count_ptr, s, BLOCK_M)
        token = pair // top_k
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        w_rows = w_ptr + expert * 2 * inter * hidden
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            x = tl.load(x_ptr + token[:, None].to(tl.int64) * hidden + k[None, :], mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
            wg = tl.load(w_rows + n[None, :].to(tl.int64) * hidden + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                         other=0.0)
            wu = tl.load(w_rows + (inter + n[None, :]).to(tl.int64) * hidden + k[:, None],
                         mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        dt = act_ptr.dtype.element_ty
        gate = acc_g.to(dt).to(tl.float32)  # rounded where the reference's GEMM output is
        up = acc_u.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
        tl.store(act_ptr + pair[:, None].to(tl.int64) * inter + n[None, :], act.to(dt), mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, weight_ptr, out_ptr, order_ptr, slot_expert_ptr, slot_start_ptr, slot_count_ptr,
                 hidden, inter, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.program_id(0)
    expert = tl.load(slot_expert_ptr + s)
    if expert >= 0:
        pair, ok = _slot_rows(order_ptr, slot_start_ptr, slot_count_ptr, s, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        w_rows = w_ptr + expert * hidden * inter
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < inter
            a = tl.load(act_ptr + pair[:, None].to(tl.int64) * inter + k[None, :], mask=ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_rows + n[None, :].to(tl.int64) * inter + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        dt = act_ptr.dtype.element_ty
        scale = tl.load(weight_ptr + pair, mask=ok, other=0.0).to(tl.float32)
        out = acc.to(dt).to(tl.float32) * scale[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * hidden + n[None, :], out, mask=ok[:, None] & n_ok[None, :])


def experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `experts_ref`, for up to 32 tokens (a prefill chunk of more takes the
    reference, which may sync: it runs once, eagerly)."""
    t, k = idx.shape
    if t > _BLOCK_M:
        return experts_ref(x, gate_up, down, idx, weights)
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    x = x.contiguous()
    order, slot_expert, slot_start, slot_count = _slots(idx, n_experts)
    n_slots = slot_expert.numel()
    act = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((t * k, hidden), dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_k = min(64, max(16, triton.next_power_of_2(hidden)))
    block_n = min(64, max(16, triton.next_power_of_2(inter)))
    _gate_up_kernel[(n_slots, triton.cdiv(inter, block_n))](
        x, gate_up, act, order, slot_expert, slot_start, slot_count, k, hidden, inter, BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_UPCAST, PRECISION=precision)
    block_n = min(64, max(16, triton.next_power_of_2(hidden)))
    block_k = min(64, max(16, triton.next_power_of_2(inter)))
    _down_kernel[(n_slots, triton.cdiv(hidden, block_n))](
        act, down, weights.reshape(-1).contiguous(), out, order, slot_expert, slot_start, slot_count, hidden, inter,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_UPCAST, PRECISION=precision)
    out = out.view(t, k, hidden)
    y = out[:, 0]
    for j in range(1, k):  # rank order, as the reference
        y = y + out[:, j]
    return y.to(x.dtype)
