"""Gated DeltaNet, the linear attention of Qwen3.5 / 3.6 (research/hybrid.md §2-3): the short causal
conv, the gated delta rule, and the masked replay that commits a verify block exactly.

Per value head, with an fp32 state S [dk, dv] and per token t (q, k l2-normed; g <= 0; 0 < beta < 1):
    S <- S * exp(g_t);   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t · dk^-1/2
A verify block of B tokens runs the rule from the committed state S0 without writing it, and keeps
each token's (k, v, g, beta). Once a drafts are accepted, `replay` reruns all B steps from S0 with g
and beta zeroed past the a + 1 committed tokens: a step with g = beta = 0 leaves S bit for bit as it
was (S·exp(0) = S, S + k·0 = S), so the result is exactly the state after the committed tokens, with
fixed shapes and no host read (a captured graph's step). The conv state is the last K-1 inputs of
the conv; committing it is a gather at a device index.

The torch references run on the CPU; on CUDA fla-core's Triton kernels (imported lazily) serve only
prefill chunks over 64 tokens (`chunk`), the conv commit is ours below. A layer's step (decode, verify,
short prefill chunks) runs the conv, the norms and the rule in kernels/gdn_glue.py's two fused kernels,
which round as the ones here do; the commit's replay (`replay_ref` here) runs in kernels/gdn_replay.py
with the same per-step arithmetic, as does a tree verify (kernels/gated_delta_tree.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv_ref(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(depthwise causal conv). window: [K-1+T, C], the K-1 previous inputs then T new ones;
    weight: [C, K]. Returns [T, C] in the window's dtype (computed in the weight's, as transformers)."""
    out = F.conv1d(window.t()[None].to(weight.dtype), weight[:, None, :], groups=weight.shape[0])
    return F.silu(out[0].t()).to(window.dtype)


def l2norm_ref(x: torch.Tensor) -> torch.Tensor:
    """x · rsqrt(Σx² + 1e-6) over the last dim, in fp32 (as transformers and fla)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_rms_norm_ref(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The linear layers' output norm: w · rmsnorm(x) · silu(z) over the last dim (plain w, not 1 + w;
    norm before gate), as transformers' Qwen3_5RMSNormGated."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(z.float())).to(x.dtype)


def gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over T steps for N independent sequences, from `state` (not modified).

    q, k: [N, T, Hk, dk] fp32, l2-normed; v: [N, T, Hv, dv]; g, beta: [N, T, Hv] fp32; state: [N, Hv, dk,
    dv] fp32. Value head h reads key head h // (Hv / Hk). Returns (o [N, T, Hv, dv] fp32, final state)."""
    group = v.shape[2] // k.shape[2]
    q = q.repeat_interleave(group, dim=2) * scale
    k = k.repeat_interleave(group, dim=2)
    v = v.float()
    s = state.clone()
    out = torch.empty_like(v)
    for t in range(k.shape[1]):
        s = s * g[:, t].exp()[..., None, None]
        kv = (s * k[:, t, ..., None]).sum(-2)
        delta = (v[:, t] - kv) * beta[:, t, :, None]
        s = s + k[:, t, ..., None] * delta[..., None, :]
        out[:, t] = (s * q[:, t, ..., None]).sum(-2)
    return out, s


def _masked(g: torch.Tensor, beta: torch.Tensor, count: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """g and beta zeroed at steps >= count (those steps then leave the state untouched)."""
    keep = torch.arange(g.shape[1], device=g.device)[None, :, None] < count
    return torch.where(keep, g, 0.0), torch.where(keep, beta, 0.0)


def replay_ref(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               count: torch.Tensor | int) -> None:
    """Advance `state` [N, Hv, dk, dv] in place by the first `count` of the T recorded steps of each of
    N sequences (k [N, T, Hk, dk], v [N, T, Hv, dv], g and beta [N, T, Hv])."""
    g, beta = _masked(g, beta, count)
    _, final = gated_delta_rule_ref(k, k, v, g, beta, state, 1.0)
    state.copy_(final)


def conv_commit_ref(conv: torch.Tensor, x: torch.Tensor, count: torch.Tensor | int) -> None:
    """conv [N, K-1, C] := the last K-1 conv inputs once `count` of the T rows x [N, T, C] are kept:
    rows count .. count+K-2 of [conv | x]."""
    window = torch.cat((conv, x), dim=1)
    index = count + torch.arange(conv.shape[1], device=conv.device)
    conv.copy_(window.index_select(1, index.reshape(-1)))


# ---- CUDA: fla-core's kernels for the rule, ours for the conv and its commit -----------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def gated_delta_rule(q, k, v, g, beta, state, scale):
    """fla-core: same contract as `gated_delta_rule_ref`. Blocks (T <= 64) take the fused recurrent
    kernel (no autotuning: graph-safe once warm); long prefill chunks the chunked one."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    rule = fused_recurrent_gated_delta_rule if k.shape[1] <= 64 else chunk_gated_delta_rule
    out, final = rule(q.contiguous(), k.contiguous(), v.contiguous(), g=g.contiguous(), beta=beta.contiguous(),
                      scale=scale, initial_state=state.contiguous(), output_final_state=True)
    return out.float(), final


@triton.jit(do_not_specialize=["t_rows"])  # prefill chunks of any length: one compile
def _causal_conv_kernel(w_ptr, x_ptr, out_ptr, t_rows, channels, K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """out[t, c] = silu(sum_j w[c, j] · window[t + j, c]) for a block of rows and channels."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows[:, None] < t_rows) & (cols[None, :] < channels)
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + cols * K + j, mask=cols < channels, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (rows[:, None] + j) * channels + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += w[None, :] * x
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + rows[:, None] * channels + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def causal_conv(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `causal_conv_ref` (accumulated in float32, rounded once)."""
    window = window.contiguous()
    c, k = weight.shape
    t = window.shape[0] - k + 1
    out = torch.empty((t, c), dtype=window.dtype, device=window.device)
    block_c = min(1024, triton.next_power_of_2(c))
    _causal_conv_kernel[(triton.cdiv(t, 16), triton.cdiv(c, block_c))](
        weight.contiguous(), window, out, t, c, K=k, BLOCK_T=16, BLOCK_C=block_c)
    return out


@triton.jit
def conv_window(conv_ptr, x_ptr, count_ptr, n, cb, x_n, x_t, channels, KEEP: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_C: tl.constexpr, path_ptr=None, HAS_PATH: tl.constexpr = False):
    """Layer n's channel block cb: conv[n] := rows count .. count+KEEP-1 of [conv[n] | x[n]] (x's layer and
    row strides x_n, x_t): every source row is read before any row is written (conv is both source and
    destination). With HAS_PATH, x's rows are taken as x[n][path] (a tree's accepted path, gathered in the
    load). Shared by `_conv_commit_kernel` and kernels/gdn_replay's one-launch commit."""
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_K)
    src = tl.load(count_ptr) + r
    c_ok = cols[None, :] < channels
    from_conv = (src < KEEP)[:, None] & (r < KEEP)[:, None] & c_ok
    from_x = (src >= KEEP)[:, None] & (r < KEEP)[:, None] & c_ok
    conv_rows = conv_ptr + n * KEEP * channels
    old = tl.load(conv_rows + src[:, None] * channels + cols[None, :], mask=from_conv, other=0.0)
    if HAS_PATH:
        row = tl.load(path_ptr + (src - KEEP), mask=(src >= KEEP) & (r < KEEP), other=0)
    else:
        row = src - KEEP
    new = tl.load(x_ptr + n * x_n + row[:, None] * x_t + cols[None, :], mask=from_x, other=0.0)
    tl.debug_barrier()
    tl.store(conv_rows + r[:, None] * channels + cols[None, :], tl.where(from_conv, old, new.to(old.dtype)),
             mask=(r < KEEP)[:, None] & c_ok)


@triton.jit
def _conv_commit_kernel(conv_ptr, x_ptr, count_ptr, t_rows, channels, KEEP: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """conv[n] := rows count .. count+KEEP-1 of [conv[n] | x[n]] (`conv_window`), x contiguous."""
    conv_window(conv_ptr, x_ptr, count_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), t_rows * channels,
                channels, channels, KEEP, BLOCK_K, BLOCK_C)


def conv_commit(conv: torch.Tensor, x: torch.Tensor, count) -> None:
    """Triton: same contract as `conv_commit_ref`; `count` is read on the device."""
    n, keep, c = conv.shape
    x = x.contiguous()
    count = count if isinstance(count, torch.Tensor) else torch.tensor(count, device=conv.device)
    block_c = min(1024, triton.next_power_of_2(c))
    _conv_commit_kernel[(n, triton.cdiv(c, block_c))](conv, x, count.reshape(1), x.shape[1], c, KEEP=keep,
                                                     BLOCK_K=max(2, triton.next_power_of_2(keep)), BLOCK_C=block_c)


# ---- The per-head norms: one program per row, the row's reduction in one fixed-size block -------------
# A torch reduction over the last dim may pick its tree (threads per row, split rows) from the number of
# rows, so a verify row and the decode of the same token could round apart (issue 24). Here a row of d
# values is one program whatever the launch holds: BLOCK follows d alone, never the row count.
@triton.jit
def _l2norm_kernel(x_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * d + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) + 1e-6)), mask=cols < d)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `l2norm_ref` (fp32 out), one program per row."""
    d = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = x.numel() // d if d else 0
    if rows:
        _l2norm_kernel[(rows,)](x, out, d, BLOCK=triton.next_power_of_2(d))
    return out


@triton.jit
def _gated_rms_norm_kernel(x_ptr, z_ptr, w_ptr, out_ptr, d, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < d
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * d + cols, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * d + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    normed = (x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps))).to(dtype).to(tl.float32)  # rounded as the reference
    tl.store(out_ptr + row * d + cols, (w * normed * (z / (1.0 + tl.exp(-z)))).to(dtype), mask=ok)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton: same contract as `gated_rms_norm_ref`, one program per row."""
    d = x.shape[-1]
    x, z = x.contiguous(), z.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // d if d else 0
    if rows:
        _gated_rms_norm_kernel[(rows,)](x, z, weight, out, d, eps, BLOCK=triton.next_power_of_2(d))
    return out
