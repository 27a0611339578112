"""The hybrid commit's replay of the Gated DeltaNet states (models/layers/gated_delta.RecurrentCache.commit) in
one launch: every linear layer's state advanced in place by the first `count` recorded steps of the verify
block, `count` read on the device (the loop stops there), so no masking of g and β, no final state to copy back.

The step is the rule's own (kernels/gdn_glue.py's `_rule_step`, on a whole head, launched with its `_warps`),
so a replayed row updates the state exactly as the same row does in a prefill chunk, a decode step or a tree
node: speculative and plain decoding keep the same recurrent state, bit for bit. (The reference stops as the
masked reference does: a step with g = 0, β = 0 leaves the state as it was.)
"""
from __future__ import annotations

import torch

from .gated_delta import conv_commit_ref, conv_window, replay_ref  # noqa: F401  (references: ops' on the CPU)
from .gdn_glue import _rule_step, _warps

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit(do_not_specialize=["t_rows"])  # a tree's path: any length, one compile
def _replay_kernel(state_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, count_ptr, t_rows, k_n, k_t, v_n, v_t, gb_n, gb_t,
                   HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
    _replay(tl.program_id(0).to(tl.int64), state_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, count_ptr, t_rows, k_n, k_t,
            v_n, v_t, gb_n, gb_t, HK, HV, K, V, BK, BV)


@triton.jit
def _replay(pid, state_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, count_ptr, t_rows, k_n, k_t, v_n, v_t, gb_n, gb_t,
            HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, path_ptr=None, HAS_PATH: tl.constexpr = False):
    """Program pid = (layer, value head): the first min(count, T) recorded rows, each `_rule_step`; with
    HAS_PATH, step r reads recorded row path[r] (a tree's accepted path, gathered in the loads)."""
    i_n, i_hv = pid // HV, pid % HV
    i_h = i_hv // (HV // HK)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_k, mask_v = o_k < K, o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    p_h = state_ptr + pid * K * V + o_k[:, None] * V + o_v[None, :]
    h = tl.load(p_h, mask=mask_h, other=0.0)
    p_k = k_ptr + i_n * k_n + i_h * K + o_k
    p_v = v_ptr + i_n * v_n + i_hv * V + o_v
    p_g = g_ptr + i_n * gb_n + i_hv
    p_beta = beta_ptr + i_n * gb_n + i_hv
    for r in range(0, tl.minimum(tl.load(count_ptr), t_rows)):
        if HAS_PATH:
            row = tl.load(path_ptr + r)
        else:
            row = r
        k = tl.load(p_k + row * k_t, mask=mask_k, other=0.0)
        v = tl.load(p_v + row * v_t, mask=mask_v, other=0.0)
        h = _rule_step(h, k, v, tl.load(p_g + row * gb_t), tl.load(p_beta + row * gb_t))
    tl.store(p_h, h, mask=mask_h)


def replay(state, k, v, g, beta, count) -> None:
    """Triton: same contract as `replay_ref` (all N layers in one launch; `count` a 0-d device tensor or an int)."""
    n, hv, dk, dv = state.shape
    hk, t = k.shape[2], k.shape[1]
    assert state.is_contiguous() and k.stride(-1) == v.stride(-1) == g.stride(-1) == beta.stride(-1) == 1
    assert k.stride(2) == dk and v.stride(2) == dv and g.stride() == beta.stride()
    assert state.dtype == k.dtype == v.dtype == g.dtype == beta.dtype == torch.float32
    count = count if isinstance(count, torch.Tensor) else torch.tensor(count, device=state.device)
    bk, bv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    _replay_kernel[(n * hv,)](
        state, k, v, g, beta, count.reshape(1), t, k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        g.stride(1), HK=hk, HV=hv, K=dk, V=dv, BK=bk, BV=bv, num_warps=_warps(bk, bv))


# ---- the whole commit: the replay and the conv windows, one launch ----------------------------------------
@triton.jit(do_not_specialize=["t_rows"])
def _commit_kernel(state_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, count_ptr, t_rows, k_n, k_t, v_n, v_t, gb_n, gb_t,
                   conv_ptr, x_ptr, x_n, x_t, channels, n_replay, c_blocks, path_ptr,
                   HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, KEEP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   HAS_PATH: tl.constexpr):
    """Programs [0, n_replay): the replay (as `_replay_kernel`); the rest, one per (layer, channel block): conv
    := rows count .. count+KEEP-1 of [conv | x] (kernels/gated_delta.conv_window), each program's
    rows read before they are written. With HAS_PATH both read the recorded rows path[0], path[1], ...
    (a tree's accepted path) where a chain reads rows 0, 1, ...: the gather is in the loads."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < n_replay:
        _replay(pid, state_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, count_ptr, t_rows, k_n, k_t, v_n, v_t, gb_n, gb_t,
                HK, HV, K, V, BK, BV, path_ptr, HAS_PATH)
    else:
        c = pid - n_replay
        conv_window(conv_ptr, x_ptr, count_ptr, c // c_blocks, c % c_blocks, x_n, x_t, channels, KEEP, BLOCK_K,
                    BLOCK_C, path_ptr, HAS_PATH)


def gdn_commit_ref(state, k, v, g, beta, conv, x, count, path=None) -> None:
    """Reference: `replay_ref`, then `conv_commit_ref` (conv [N, K-1, C] and the recorded conv inputs x [N, T, C]).
    path ([P] int64, or None: rows 0..T-1): the recorded rows to commit, in order (a tree's accepted path;
    count <= P)."""
    if path is not None:
        k, v, g, beta, x = (r.index_select(1, path) for r in (k, v, g, beta, x))
    replay_ref(state, k, v, g, beta, count)
    conv_commit_ref(conv, x, count)


def gdn_commit(state, k, v, g, beta, conv, x, count, path=None) -> None:
    """Triton: same contract as `gdn_commit_ref`, one launch (the replay's programs, then the conv windows'),
    a path's rows gathered in the kernel's loads (no copy of the records)."""
    n, hv, dk, dv = state.shape
    _, keep, channels = conv.shape
    assert state.is_contiguous() and conv.is_contiguous() and x.stride(-1) == 1
    assert k.stride(-1) == v.stride(-1) == g.stride(-1) == beta.stride(-1) == 1
    assert k.stride(2) == dk and v.stride(2) == dv and g.stride() == beta.stride()
    assert state.dtype == k.dtype == v.dtype == g.dtype == beta.dtype == torch.float32
    assert path is None or (path.dtype == torch.int64 and path.dim() == 1 and path.stride(0) == 1)
    count = count if isinstance(count, torch.Tensor) else torch.tensor(count, device=state.device)
    bk, bv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    n_replay = n * hv
    block_c = min(1024, triton.next_power_of_2(channels))
    c_blocks = triton.cdiv(channels, block_c)
    rows = k.shape[1] if path is None else path.shape[0]
    _commit_kernel[(n_replay + n * c_blocks,)](
        state, k, v, g, beta, count.reshape(1), rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), conv, x, x.stride(0), x.stride(1), channels, n_replay, c_blocks,
        count if path is None else path, HK=k.shape[2],
        HV=hv, K=dk, V=dv, BK=bk, BV=bv, KEEP=keep, BLOCK_K=max(2, triton.next_power_of_2(keep)), BLOCK_C=block_c,
        HAS_PATH=path is not None, num_warps=_warps(bk, bv))  # the rule's warps: a replayed step rounds as the rule's
