"""The gated delta rule down a drafted tree (tree verification on a hybrid target, dflash_cli/tree.py):
node i's step runs from its parent's state after the parent's step; the root's from the committed state.
Each node's output row goes through the gated RMSNorm in the same program, as a chain's does.

Nodes come parents first, so one pass in node order serves: per value head, one program walks the nodes,
keeping each node's state in a scratch buffer [N, Hv, dk, dv] from which its children load it. Every step
is kernels/gdn_glue.py's `_rule_step` on a whole head, launched with its warps, and every output row its
`_gated_norm`: a node's state and output are, bit for bit, those of the chain of its path through
`gdn_rule_norm` (and so of the commit's replay and of a fresh prefill), and depend on its own path alone
(never on how many nodes share the launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gdn_glue import _gated_norm, _rule_step, _warps, gdn_rule_norm_ref


def tree_rule_norm_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, parents: torch.Tensor, scale: float, z: torch.Tensor,
                       norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """q, k [N, Hk, dk] fp32 (l2-normed); v [N, Hv, dv]; g, beta [N, Hv] fp32; state [Hv, dk, dv] fp32 (not
    modified); parents [N] int64 (parents[i] < i for i > 0; node 0 starts from `state`); z [N, Hv·dv].
    Returns [N, Hv, dv] in z's dtype: each node is `gdn_rule_norm_ref`'s one-row step from its parent's
    state (the chain's step, the same ops in the same order)."""
    n = q.shape[0]
    states = state.new_empty((n, *state.shape))
    out = torch.empty(v.shape, dtype=z.dtype, device=z.device)
    for i in range(n):
        # the parent's state by a device index (no host read: a captured step's)
        s = state.clone() if i == 0 else states.index_select(0, parents[i:i + 1])[0]
        row = slice(i, i + 1)
        out[i] = gdn_rule_norm_ref(q[row], k[row], v[row], g[row], beta[row], s, scale, z[row], norm_weight, eps,
                                   True)[0]
        states[i] = s
    return out


@triton.jit(do_not_specialize=["n_nodes"])  # every budget: one compile
def _tree_rule_norm_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, parents_ptr, scratch_ptr, z_ptr,
                           z_stride, w_ptr, out_ptr, n_nodes, scale, eps, HK: tl.constexpr, HV: tl.constexpr,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    hv = tl.program_id(0).to(tl.int64)
    hk = hv // (HV // HK)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    tile = mk[:, None] & mv[None, :]
    at = rk[:, None] * DV + rv[None, :]
    dtype = out_ptr.dtype.element_ty
    start = tl.load(state_ptr + hv * DK * DV + at, mask=tile, other=0.0)
    w = tl.load(w_ptr + rv, mask=mv, other=0.0).to(tl.float32)
    for i in range(n_nodes):
        parent = tl.load(parents_ptr + i)
        loaded = tl.load(scratch_ptr + (parent * HV + hv) * DK * DV + at, mask=tile & (i > 0), other=0.0)
        h = tl.where(i > 0, loaded, start)
        q = tl.load(q_ptr + (i * HK + hk) * DK + rk, mask=mk, other=0.0) * scale
        k = tl.load(k_ptr + (i * HK + hk) * DK + rk, mask=mk, other=0.0)
        v = tl.load(v_ptr + (i * HV + hv) * DV + rv, mask=mv, other=0.0)
        h = _rule_step(h, k, v, tl.load(g_ptr + i * HV + hv), tl.load(beta_ptr + i * HV + hv))
        z = tl.load(z_ptr + i * z_stride + hv * DV + rv, mask=mv, other=0.0).to(tl.float32)
        tl.store(out_ptr + (i * HV + hv) * DV + rv, _gated_norm(tl.sum(h * q[:, None], 0), z, w, eps, DV, dtype),
                 mask=mv)
        tl.store(scratch_ptr + (i * HV + hv) * DK * DV + at, h, mask=tile)
        tl.debug_barrier()  # a child (a later node) loads this state: written before any thread reads it


def tree_rule_norm(q, k, v, g, beta, state, parents, scale, z, norm_weight, eps) -> torch.Tensor:
    """Triton: same contract as `tree_rule_norm_ref`, one launch for the whole tree. q, k, v, g, beta:
    contiguous fp32 (gdn_prologue's, a record's first rows); z: rows of stride z.stride(0)."""
    n, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    assert z.stride(-1) == 1 and state.is_contiguous() and all(x.is_contiguous() for x in (q, k, v, g, beta))
    out = torch.empty((n, hv, dv), dtype=z.dtype, device=z.device)
    scratch = torch.empty((n, hv, dk, dv), dtype=torch.float32, device=q.device)
    bk, bv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    if n:
        _tree_rule_norm_kernel[(hv,)](q, k, v, g, beta, state, parents.contiguous(), scratch, z, z.stride(0),
                                      norm_weight, out, n, scale, eps, HK=hk, HV=hv, DK=dk, DV=dv, BK=bk, BV=bv,
                                      num_warps=_warps(bk, bv))
    return out


# ---- the tree's shape, as every linear layer of a tree verify gathers by ------------------------------------
def tree_windows_ref(mask: torch.Tensor, rows: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree of a tree verify's N nodes, read from its attention mask (mask [N, capacity] bool; rows [N]: the
    nodes' cache rows, so mask[:, rows] is the ancestor matrix): (parents [N] int64, the root's 0: the deepest
    ancestor before a node; windows [N, keep + 1] int64: each node's conv window oldest first, as rows of
    [committed keep inputs | nodes]: row keep - m holds its ancestor m levels up (m <= depth) or, above the
    root, the committed input m - depth back)."""
    ancestors = mask.index_select(1, rows)  # [N, N]: [i, j] = j is i or an ancestor of i
    index = torch.arange(ancestors.shape[0], device=ancestors.device)
    strict = ancestors & (index[None, :] < index[:, None])
    parents = (strict.to(torch.int64) * index[None, :]).amax(dim=1)  # the deepest ancestor comes last
    depths = ancestors.sum(dim=1) - 1
    up, windows = index, [keep + index]
    for m in range(1, keep + 1):
        up = parents.index_select(0, up)
        windows.append(torch.where(depths >= m, keep + up, keep - (m - depths)))
    return parents, torch.stack(windows[::-1], dim=1)


@triton.jit
def _tree_windows_kernel(mask_ptr, rows_ptr, parents_ptr, windows_ptr, n_nodes, capacity, KEEP: tl.constexpr,
                         BN: tl.constexpr):
    node = tl.arange(0, BN)
    ok = node < n_nodes
    col = tl.load(rows_ptr + node, mask=ok, other=0)
    ancestors = tl.load(mask_ptr + node[:, None] * capacity + col[None, :], mask=ok[:, None] & ok[None, :],
                        other=0) != 0
    strict = ancestors & (node[None, :] < node[:, None])
    parents = tl.max(tl.where(strict, node[None, :], 0), axis=1).to(tl.int64)
    depths = tl.sum(ancestors.to(tl.int64), axis=1) - 1
    tl.store(parents_ptr + node, parents, mask=ok)
    tl.store(windows_ptr + node * (KEEP + 1) + KEEP, KEEP + node.to(tl.int64), mask=ok)
    up = node.to(tl.int64)
    for m in tl.static_range(1, KEEP + 1):
        up = tl.sum(tl.where(node[None, :] == up[:, None], parents[None, :], 0), axis=1)  # parents[up]
        tl.store(windows_ptr + node * (KEEP + 1) + KEEP - m, tl.where(depths >= m, KEEP + up, KEEP - (m - depths)),
                 mask=ok)


def tree_windows(mask, rows, keep):
    """Triton: same contract as `tree_windows_ref`, one launch of one program."""
    n, capacity = mask.shape
    parents = torch.empty(n, dtype=torch.int64, device=mask.device)
    windows = torch.empty((n, keep + 1), dtype=torch.int64, device=mask.device)
    _tree_windows_kernel[(1,)](mask.contiguous().view(torch.int8), rows.contiguous(), parents, windows, n, capacity,
                               KEEP=keep, BN=max(2, triton.next_power_of_2(n)))
    return parents, windows
