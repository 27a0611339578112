"""The Gated DeltaNet glue of a step in two launches (issue 26): what a linear-attention layer runs between
its in-projection and its out-projection, which was ~17 launches of torch ops and small kernels.

- `gdn_prologue`: from the in-projection's rows [mixed | z | b | a], the conv step over the cached window,
  SiLU, the l2norm of q and k, g = -exp(A_log)·softplus(a + dt_bias) and beta = sigmoid(b), written
  straight into the verify record (conv input, k, v, g, beta) that the commit replays: no cat, no
  `.contiguous()`, no copies.
- `gdn_rule_norm`: the gated delta rule from the committed state (written through only on a prefill
  chunk), each output row through the gated RMSNorm (w · rmsnorm(o) · silu(z)) in the same program.

Each is the torch chain it replaces (`*_ref`, what the CPU runs), and the Triton kernels round as the
kernels they replace did (kernels/gated_delta.py's conv, l2norm and gated norm): the conv accumulates in
fp32 and rounds once to the activations' dtype, q/k/v are that rounded value in fp32, and the rule's
output is rounded to the activations' dtype before its norm. Only g and beta (softplus, sigmoid) may
differ from torch's in the last bits. A row is one program per head whatever the launch holds, so a
row's result does not depend on the number of rows (batch invariance, issue 24).

One recurrence arithmetic (`_rule_step`, whole heads, `_warps`): a token's state update rounds alike
whether it is a prefill chunk's row, a committed decode step, a verify row replayed by the commit
(kernels/gdn_replay.py) or a drafted tree's node (kernels/gated_delta_tree.py); and a tree node's q, k, v, g,
beta come from this prologue too, over its own conv window (`windows`). Only a prefill chunk over
MAX_RULE_ROWS rows (fla's chunked rule) rounds apart; plain and speculative decoding share the prefill.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gated_delta import causal_conv_ref, gated_delta_rule_ref, gated_rms_norm_ref, l2norm_ref

MAX_RULE_ROWS = 64  # longer prefill chunks take fla's chunked rule (kernels/gated_delta.py)


def _columns(proj: torch.Tensor, conv_dim: int, value_dim: int, heads_v: int):
    """The in-projection's [mixed | z | b | a] column groups (views)."""
    return proj.split([conv_dim, value_dim, heads_v, heads_v], dim=-1)


def gdn_prologue_ref(proj: torch.Tensor, conv: torch.Tensor, weight: torch.Tensor, a_log: torch.Tensor,
                     dt_bias: torch.Tensor, heads_k: int, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, x: torch.Tensor | None = None,
                     windows: torch.Tensor | None = None) -> torch.Tensor:
    """proj [T, C + Hv·dv + 2·Hv]: the in-projection's rows; conv [K-1, C]: the conv's last inputs (read
    only); weight [C, K]. Writes k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv] (fp32) and, given, x [T, C]
    := the conv inputs; returns q [T, Hk, dk] fp32 (q and k l2-normed). Row t's conv window is rows
    t .. t+K-1 of [conv | proj's conv columns], or, given `windows` [T, K] int64 (a tree's nodes), the
    rows windows[t] of it."""
    t, (_, heads_v, dv) = proj.shape[0], v.shape
    c, dk = conv.shape[-1], k.shape[-1]
    mixed, _, b, a = _columns(proj, c, heads_v * dv, heads_v)
    window = torch.cat((conv, mixed))
    if windows is None:
        qkv = causal_conv_ref(window, weight)
    else:  # the windows laid end to end, every K-th output kept
        qkv = causal_conv_ref(window.index_select(0, windows.reshape(-1)), weight)[::weight.shape[1]]
    q, kk, vv = qkv.split([heads_k * dk, heads_k * dk, heads_v * dv], dim=-1)
    k.copy_(l2norm_ref(kk.reshape(t, heads_k, dk)))
    v.copy_(vv.reshape(t, heads_v, dv))
    # g and beta in float64, rounded once: torch's CPU exp/log1p/sigmoid round an element differently in their
    # vectorized body and their scalar tail, so in fp32 a row's g would depend on its place in the block (a
    # verify row against the same token inside a prefill chunk); the kernel computes each row alike anyway
    beta.copy_(b.double().sigmoid().to(b.dtype))
    g.copy_(-a_log.double().exp() * F.softplus(a.double() + dt_bias.double()))
    if x is not None:
        x.copy_(mixed)
    return l2norm_ref(q.reshape(t, heads_k, dk))


def gdn_rule_norm_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      state: torch.Tensor, scale: float, z: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      write_state: bool) -> torch.Tensor:
    """The rule over T rows from `state` [Hv, dk, dv] (one sequence; q, k [T, Hk, dk], v [T, Hv, dv], g,
    beta [T, Hv], fp32), written back with the final state when `write_state`; returns
    gated_rms_norm(o rounded to z's dtype, z) [T, Hv, dv] (z: [T, Hv·dv], may be a strided view)."""
    out, final = gated_delta_rule_ref(q[None], k[None], v[None], g[None], beta[None], state[None], scale)
    if write_state:
        state.copy_(final[0])
    return gated_rms_norm_ref(out[0].to(z.dtype), z.reshape(out.shape[1:]), norm_weight, eps)


# ---- Triton -----------------------------------------------------------------------------------------------
@triton.jit
def _conv_row(proj_ptr, proj_stride, conv_ptr, w_ptr, win_ptr, t, channels, start, width, K: tl.constexpr,
              WINDOWS: tl.constexpr, BLOCK: tl.constexpr):
    """silu(conv) of row t at channels start .. start+width-1, rounded to the activations' dtype, in fp32
    (kernels/gated_delta.py's _causal_conv_kernel, the same ops in the same order). Window row r (t + j,
    or windows[t, j]) is the cached conv row r for r < K-1, else the in-projection's row r-(K-1)."""
    cols = start + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < width
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        if WINDOWS:
            r = tl.load(win_ptr + t * K + j) + 0 * cols
        else:
            r = t + j + 0 * cols  # as a vector: Triton's interpreter cannot `and` a scalar into a mask
        w = tl.load(w_ptr + cols * K + j, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(conv_ptr + r * channels + cols, mask=ok & (r < K - 1), other=0.0)
        new = tl.load(proj_ptr + (r - (K - 1)) * proj_stride + cols, mask=ok & (r >= K - 1), other=0.0)
        acc += w * tl.where(r < K - 1, old, new).to(tl.float32)
    out = acc / (1.0 + tl.exp(-acc))
    return out.to(proj_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _prologue_kernel(proj_ptr, proj_stride, conv_ptr, w_ptr, a_log_ptr, dt_bias_ptr, q_ptr, k_ptr, v_ptr, g_ptr,
                     beta_ptr, x_ptr, win_ptr, channels, HK: tl.constexpr, DK: tl.constexpr, HV: tl.constexpr,
                     DV: tl.constexpr, K: tl.constexpr, RECORD: tl.constexpr, WINDOWS: tl.constexpr,
                     BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (t, p): p < 2·Hk a q or k head (conv, l2norm), p < 2·Hk + Hv a v head (conv), the last
    one g and beta of all value heads. Each writes its channels' conv inputs to the record."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    row = proj_ptr + t * proj_stride
    if p < 2 * HK:
        y = _conv_row(proj_ptr, proj_stride, conv_ptr, w_ptr, win_ptr, t, channels, p * DK, DK, K, WINDOWS,
                      BLOCK_K)
        y = y * (1.0 / tl.sqrt(tl.sum(y * y, axis=0) + 1e-6))  # kernels/gated_delta.py's _l2norm_kernel
        d = tl.arange(0, BLOCK_K)
        is_q = 0 * d + p < HK  # a vector, as in _conv_row
        tl.store(q_ptr + (t * HK + p) * DK + d, y, mask=(d < DK) & is_q)
        tl.store(k_ptr + (t * HK + p - HK) * DK + d, y, mask=(d < DK) & ~is_q)
        if RECORD:
            tl.store(x_ptr + t * channels + p * DK + d, tl.load(row + p * DK + d, mask=d < DK), mask=d < DK)
    elif p < 2 * HK + HV:
        start = 2 * HK * DK + (p - 2 * HK) * DV
        y = _conv_row(proj_ptr, proj_stride, conv_ptr, w_ptr, win_ptr, t, channels, start, DV, K, WINDOWS,
                      BLOCK_V)
        d = tl.arange(0, BLOCK_V)
        tl.store(v_ptr + (t * HV + p - 2 * HK) * DV + d, y, mask=d < DV)
        if RECORD:
            tl.store(x_ptr + t * channels + start + d, tl.load(row + start + d, mask=d < DV), mask=d < DV)
    else:
        h = tl.arange(0, BLOCK_H)
        ok = h < HV
        b = tl.load(row + channels + HV * DV + h, mask=ok, other=0.0)
        a = tl.load(row + channels + HV * DV + HV + h, mask=ok, other=0.0).to(tl.float32)
        beta = (1.0 / (1.0 + tl.exp(-b.to(tl.float32)))).to(b.dtype)  # sigmoid in the activations' dtype
        x = a + tl.load(dt_bias_ptr + h, mask=ok, other=0.0)
        # softplus (torch's: x past 20 as is), log1p(exp(-|x|)) exact for tiny arguments (Goldberg)
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        softplus = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)
        g = -tl.exp(tl.load(a_log_ptr + h, mask=ok, other=0.0)) * softplus
        tl.store(g_ptr + t * HV + h, g, mask=ok)
        tl.store(beta_ptr + t * HV + h, beta.to(tl.float32), mask=ok)


def gdn_prologue(proj: torch.Tensor, conv: torch.Tensor, weight: torch.Tensor, a_log: torch.Tensor,
                 dt_bias: torch.Tensor, heads_k: int, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor, x: torch.Tensor | None = None, windows: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Triton: same contract as `gdn_prologue_ref`, one launch. k, v, g, beta, x: contiguous (a record's
    first rows, or new)."""
    t, (_, heads_v, dv) = proj.shape[0], v.shape
    c, dk = conv.shape[-1], k.shape[-1]
    assert proj.stride(-1) == 1 and conv.is_contiguous() and weight.is_contiguous()
    assert all(o.is_contiguous() for o in (k, v, g, beta) + (() if x is None else (x,)))
    assert windows is None or windows.is_contiguous()
    q = torch.empty_like(k)
    if t:
        _prologue_kernel[(t, 2 * heads_k + heads_v + 1)](
            proj, proj.stride(0), conv, weight, a_log, dt_bias, q, k, v, g, beta, proj if x is None else x,
            proj if windows is None else windows, c, HK=heads_k, DK=dk, HV=heads_v, DV=dv, K=weight.shape[1],
            RECORD=x is not None, WINDOWS=windows is not None,
            BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=triton.next_power_of_2(dv),
            BLOCK_H=triton.next_power_of_2(heads_v))
    return q


@triton.jit
def _rule_step(h, k, v, g, beta):
    """One token's step of the gated delta rule on a whole head's state h [BK, BV] (fla's fused recurrent
    step): the one arithmetic of every state update, so that a token's state rounds alike in a prefill
    chunk, a decode step, a commit's replay and a tree's node (each launched with `_warps`)."""
    h *= tl.exp(g)
    v = beta * (v - tl.sum(h * k[:, None], 0))
    h += k[:, None] * v[None, :]
    return h


@triton.jit
def _gated_norm(o, z, w, eps, DV: tl.constexpr, dtype: tl.constexpr):
    """w · rmsnorm(o) · silu(z) of one output row (o rounded to dtype first; _gated_rms_norm_kernel's ops)."""
    o = o.to(dtype).to(tl.float32)
    normed = (o * (1.0 / tl.sqrt(tl.sum(o * o, axis=0) / DV + eps))).to(dtype).to(tl.float32)
    return (w * normed * (z / (1.0 + tl.exp(-z)))).to(dtype)


def _warps(bk: int, bv: int) -> int:
    """The warps of every launch of `_rule_step`: a reduction's order follows the tile and the warps."""
    return 8 if bk * bv >= 128 * 128 else 4


@triton.jit(do_not_specialize=["t_rows"])
def _rule_norm_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, z_ptr, z_stride, w_ptr, out_ptr, t_rows,
                      scale, eps, HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, WRITE_STATE: tl.constexpr):
    """One program per value head: its state [dk, dv] in registers over the T rows (`_rule_step`), each
    output row normed and gated at once (`_gated_norm`)."""
    hv = tl.program_id(0).to(tl.int64)
    hk = hv // (HV // HK)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    dtype = out_ptr.dtype.element_ty
    s_ptrs = state_ptr + hv * DK * DV + rk[:, None] * DV + rv[None, :]
    h = tl.load(s_ptrs, mask=mk[:, None] & mv[None, :], other=0.0)
    w = tl.load(w_ptr + rv, mask=mv, other=0.0).to(tl.float32)
    for t in range(t_rows):
        q = tl.load(q_ptr + (t * HK + hk) * DK + rk, mask=mk, other=0.0) * scale
        k = tl.load(k_ptr + (t * HK + hk) * DK + rk, mask=mk, other=0.0)
        v = tl.load(v_ptr + (t * HV + hv) * DV + rv, mask=mv, other=0.0)
        h = _rule_step(h, k, v, tl.load(g_ptr + t * HV + hv), tl.load(beta_ptr + t * HV + hv))
        z = tl.load(z_ptr + t * z_stride + hv * DV + rv, mask=mv, other=0.0).to(tl.float32)
        out = _gated_norm(tl.sum(h * q[:, None], 0), z, w, eps, DV, dtype)
        tl.store(out_ptr + (t * HV + hv) * DV + rv, out, mask=mv)
    if WRITE_STATE:  # each program read its own head's state first: in place is safe
        tl.store(s_ptrs, h, mask=mk[:, None] & mv[None, :])


def gdn_rule_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  state: torch.Tensor, scale: float, z: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  write_state: bool) -> torch.Tensor:
    """Triton: same contract as `gdn_rule_norm_ref`, one launch for up to MAX_RULE_ROWS rows (a step's, a
    short prefill chunk's); a longer prefill chunk runs fla's chunked rule, then the gated norm."""
    t, heads_v, dv = v.shape
    if t > MAX_RULE_ROWS:
        from .gated_delta import gated_delta_rule, gated_rms_norm

        out, final = gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], state[None], scale)
        if write_state:
            state.copy_(final[0])
        return gated_rms_norm(out[0].to(z.dtype), z.reshape(t, heads_v, dv), norm_weight, eps)
    assert z.stride(-1) == 1 and state.is_contiguous() and all(a.is_contiguous() for a in (q, k, v, g, beta))
    out = torch.empty((t, heads_v, dv), dtype=z.dtype, device=z.device)
    if t:
        dk, bk, bv = k.shape[-1], triton.next_power_of_2(k.shape[-1]), triton.next_power_of_2(dv)
        _rule_norm_kernel[(heads_v,)](q, k, v, g, beta, state, z, z.stride(0), norm_weight, out, t, scale, eps,
                                      HK=k.shape[1], HV=heads_v, DK=dk, DV=dv, BK=bk, BV=bv,
                                      WRITE_STATE=write_state, num_warps=_warps(bk, bv))
    return out

