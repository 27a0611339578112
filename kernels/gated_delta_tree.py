"""The gated delta rule down a drafted tree (tree verification on a hybrid target, dflash_cli/tree.py):
node i's step runs from its parent's state after the parent's step; the root's from the committed state.

Nodes come parents first, so one pass in node order serves: per value head and block of value columns,
one program walks the nodes, keeping each node's state in a scratch buffer [N, Hv, dk, dv] from which its
children load it. A node's output depends on its own path alone (never on how many nodes share the
launch), as a chain's row depends on the rows before it alone.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def tree_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  state: torch.Tensor, parents: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [N, Hk, dk] fp32 (l2-normed); v [N, Hv, dv]; g, beta [N, Hv] fp32; state [Hv, dk, dv] fp32 (not
    modified); parents [N] int64 (parents[i] < i for i > 0; node 0 starts from `state`). Value head h reads
    key head h // (Hv / Hk). Returns o [N, Hv, dv] fp32. Each node's step is the chain's own step
    (kernels/gated_delta.gated_delta_rule_ref, the same ops in the same order), from its parent's state."""
    group = v.shape[1] // k.shape[1]
    q = q.repeat_interleave(group, dim=1) * scale
    k = k.repeat_interleave(group, dim=1)
    v = v.float()
    n = q.shape[0]
    states = state.new_empty((n, *state.shape))
    out = torch.empty_like(v)
    for i in range(n):
        s = state if i == 0 else states.index_select(0, parents[i:i + 1])[0]
        s = s * g[i].exp()[..., None, None]
        delta = (v[i] - (s * k[i, ..., None]).sum(-2)) * beta[i, :, None]
        s = s + k[i, ..., None] * delta[..., None, :]
        states[i] = s
        out[i] = (s * q[i, ..., None]).sum(-2)
    return out


@triton.jit(do_not_specialize=["n_nodes"])  # every budget: one compile
def _tree_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, parents_ptr, scratch_ptr, out_ptr, n_nodes,
                      scale, HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    hv = tl.program_id(0)
    hk = hv // (HV // HK)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    tile = mk[:, None] & mv[None, :]
    at = rk[:, None] * DV + rv[None, :]
    start = tl.load(state_ptr + hv * DK * DV + at, mask=tile, other=0.0).to(tl.float32)
    for i in range(n_nodes):
        parent = tl.load(parents_ptr + i)
        loaded = tl.load(scratch_ptr + (parent * HV + hv) * DK * DV + at, mask=tile & (i > 0), other=0.0)
        s = tl.where(i > 0, loaded, start)
        kk = tl.load(k_ptr + (i * HK + hk) * DK + rk, mask=mk, other=0.0).to(tl.float32)
        qq = tl.load(q_ptr + (i * HK + hk) * DK + rk, mask=mk, other=0.0).to(tl.float32) * scale
        vv = tl.load(v_ptr + (i * HV + hv) * DV + rv, mask=mv, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + i * HV + hv).to(tl.float32))
        b = tl.load(beta_ptr + i * HV + hv).to(tl.float32)
        s = s * decay
        delta = (vv - tl.sum(s * kk[:, None], axis=0)) * b
        s = s + kk[:, None] * delta[None, :]
        tl.store(out_ptr + (i * HV + hv) * DV + rv, tl.sum(s * qq[:, None], axis=0), mask=mv)
        tl.store(scratch_ptr + (i * HV + hv) * DK * DV + at, s, mask=tile)
        tl.debug_barrier()  # a child (a later node) loads this state: written before any thread reads it


def tree_rule(q, k, v, g, beta, state, parents, scale) -> torch.Tensor:
    """Triton: same contract as `tree_rule_ref`, one launch for the whole tree."""
    n, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    out = torch.empty((n, hv, dv), dtype=torch.float32, device=q.device)
    scratch = torch.empty((n, hv, dk, dv), dtype=torch.float32, device=q.device)
    block_v = min(32, triton.next_power_of_2(dv))
    _tree_rule_kernel[(hv, triton.cdiv(dv, block_v))](
        q.contiguous(), k.contiguous(), v.float().contiguous(), g.contiguous(), beta.contiguous(), state.contiguous(),
        parents.contiguous(), scratch, out, n, scale, HK=hk, HV=hv, DK=dk, DV=dv, BK=triton.next_power_of_2(dk),
        BV=block_v)
    return out
