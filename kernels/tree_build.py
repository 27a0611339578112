"""A drafted tree's best-first build and the target's walk down it (dflash_cli/tree.py), each one launch.

The build pops `budget - 1` times from a frontier of 2·budget + 1 candidate slots; the reference is ~25
torch ops per pop (an index_select per field, the pushes, the ancestor row), ~375 launches at 16 nodes. The
kernel is one program that holds the frontier and the tree in registers (a few hundred values at the budgets
the engine uses) and makes the same pops in the same order: the first maximal slot (argmax's tie rule),
each pushed score the same single fp32 add, so its tree is the reference's bit for bit. The walk follows
the target's tokens from the root, `depth` steps of integer compares (one program).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

NEG_INF = float("-inf")


def tree_build_ref(anchor: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor, budget: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best-first tree of `budget` nodes over per-depth candidates (logp [D, K] fp32 sorted descending per
    row, ids [D, K] int64: row d the K best tokens at depth d + 1), rooted at `anchor` ([1] id). Returns
    (tokens [N] int64, -1 unfilled; parents [N]; depths [N]; ancestors [N, N] bool; scores [N] fp32, the
    path log-probabilities, -inf unfilled). Fixed shapes, no host read: `budget - 1` unrolled pops."""
    device = logp.device
    depth_max, k = logp.shape
    n, slots = budget, 2 * budget + 1
    long = dict(dtype=torch.int64, device=device)
    tokens = torch.full((n,), -1, **long)
    tokens[:1] = anchor.view(1)
    parents = torch.zeros(n, **long)
    depths = torch.zeros(n, **long)
    scores = torch.full((n,), NEG_INF, dtype=torch.float32, device=device)
    scores[:1].zero_()  # a slice's fill: no host scalar uploaded inside a capture
    ancestors = torch.eye(n, dtype=torch.bool, device=device)
    # The frontier: candidate (score, depth 1.., rank, parent node, parent's score); -inf: empty.
    f_score = torch.full((slots,), NEG_INF, dtype=torch.float32, device=device)
    f_depth = torch.ones(slots, **long)
    f_rank = torch.zeros(slots, **long)
    f_parent = torch.zeros(slots, **long)
    f_base = torch.zeros(slots, dtype=torch.float32, device=device)
    if depth_max > 0:
        f_score[:1].copy_(logp[0, :1])
    flat_logp, flat_ids = logp.reshape(-1), ids.reshape(-1)
    counter = torch.arange(2 * n, **long)  # node and frontier slot indices (no host-to-device copy in the step)
    for i in range(1, n):
        best = f_score.argmax().view(1)  # the first maximal slot: ties go to the earlier candidate
        frontier = (f_score, f_depth, f_rank, f_parent, f_base)
        score, depth, rank, parent, base = (t.index_select(0, best) for t in frontier)
        filled = score > NEG_INF
        row = ((depth - 1) * k + rank).clamp(0, flat_ids.shape[0] - 1)
        node = counter[i:i + 1]
        tokens.index_copy_(0, node, torch.where(filled, flat_ids.index_select(0, row), -1))
        parents.index_copy_(0, node, torch.where(filled, parent, 0))
        depths.index_copy_(0, node, torch.where(filled, depth, 1))
        scores.index_copy_(0, node, score)
        line = ancestors.index_select(0, torch.where(filled, parent, node)) | ancestors.index_select(0, node)
        ancestors.index_copy_(0, node, line)
        f_score.index_fill_(0, best, NEG_INF)
        # its next sibling (same parent, rank + 1) and its first child (depth + 1, rank 0)
        sib_ok = filled & (rank + 1 < k)
        sib = base + flat_logp.index_select(0, ((depth - 1) * k + rank + 1).clamp(0, flat_logp.shape[0] - 1))
        child_ok = filled & (depth < depth_max)
        child = score + flat_logp.index_select(0, (depth * k).clamp(0, flat_logp.shape[0] - 1))
        pair = counter[2 * i - 1:2 * i + 1]
        pushed = torch.cat((torch.where(sib_ok, sib, NEG_INF), torch.where(child_ok, child, NEG_INF)))
        f_score.index_copy_(0, pair, pushed)
        f_depth.index_copy_(0, pair, torch.cat((depth, depth + 1)))
        f_rank.index_copy_(0, pair, torch.cat((rank + 1, torch.zeros_like(rank))))
        f_parent.index_copy_(0, pair, torch.cat((parent, node)))
        f_base.index_copy_(0, pair, torch.cat((base, score)))
    return tokens, parents, depths, ancestors, scores


def tree_walk_ref(tokens: torch.Tensor, parents: torch.Tensor, targets: torch.Tensor, depth_max: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow the target's tokens (`targets` [N]: its token at each node) from the root: at each node descend
    to the first child holding the target's token, else stop there. Returns (path [depth_max + 1]: the visited
    nodes in order, the last one repeated past the stop; accepted: 0-d int64, the nodes descended to)."""
    device = targets.device
    current = torch.zeros((), dtype=torch.int64, device=device)
    alive = torch.ones((), dtype=torch.bool, device=device)
    accepted = torch.zeros((), dtype=torch.int64, device=device)
    path = [current]
    for _ in range(depth_max):
        want = targets.index_select(0, current.view(1))
        match = ((parents == current) & (tokens == want))[1:]  # not the root (its own parent)
        found = match.any() & alive
        child = match.to(torch.int64).argmax() + 1  # the first matching node (ids are distinct among siblings)
        current = torch.where(found, child, current)
        alive = found
        accepted = accepted + found.to(torch.int64)
        path.append(current)
    return torch.stack(path), accepted


class _Nodes(NamedTuple):  # what adaptive.walk_record reads of a tree.Tree
    tokens: torch.Tensor
    parents: torch.Tensor


def tree_verdict_ref(tokens: torch.Tensor, parents: torch.Tensor, targets: torch.Tensor, depth_max: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tree iteration's verdict: the walk (`tree_walk_ref`), and what the engine reads back and commits.
    Returns (packed [4·(depth_max + 1)]: accepted, the target's tokens along the path, the path's node ids,
    then adaptive.walk_record's ranks and children; path [depth_max + 1]; count: 0-d, accepted + 1, the rows
    the commit keeps; bonus [1]: the target's token at the stop node, the next iteration's anchor)."""
    from ..adaptive import walk_record

    path, accepted = tree_walk_ref(tokens, parents, targets, depth_max)
    emitted = targets.index_select(0, path)
    packed = torch.cat((accepted.view(1), emitted, tokens.index_select(0, path),
                        walk_record(_Nodes(tokens, parents), path)))
    return packed, path, accepted + 1, emitted.gather(0, accepted.view(1))


# ---- Triton ---------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _at(x, index, at):
    """x[at] of a register vector x indexed by `index` (an integer vector; one position holds `at`)."""
    return tl.sum(tl.where(index == at, x, 0), axis=0)


@triton.jit(do_not_specialize=["n_nodes", "depth_max", "k"])  # every budget and depth: one compile
def _build_kernel(anchor_ptr, logp_ptr, ids_ptr, tokens_ptr, parents_ptr, depths_ptr, ancestors_ptr, scores_ptr,
                  n_nodes, depth_max, k, BN: tl.constexpr, BS: tl.constexpr):
    slot = tl.arange(0, BS)
    node = tl.arange(0, BN)
    last = depth_max * k - 1  # the last candidate row (a clamp, as the reference's)
    first = tl.load(logp_ptr, mask=depth_max > 0, other=float("-inf"))
    f_score = tl.where(slot == 0, first, float("-inf"))
    f_depth = tl.full((BS,), 1, tl.int64)
    f_rank = tl.zeros((BS,), tl.int64)
    f_parent = tl.zeros((BS,), tl.int64)
    f_base = tl.zeros((BS,), tl.float32)
    tokens = tl.where(node == 0, tl.load(anchor_ptr), -1).to(tl.int64)
    parents = tl.zeros((BN,), tl.int64)
    depths = tl.zeros((BN,), tl.int64)
    scores = tl.where(node == 0, 0.0, float("-inf"))
    ancestors = (node[:, None] == node[None, :]).to(tl.int32)
    for i in range(1, n_nodes):
        top = tl.max(f_score, axis=0)
        best = tl.min(tl.where(f_score == top, slot, BS), axis=0)  # the first maximal slot, as argmax
        score = tl.max(tl.where(slot == best, f_score, float("-inf")), axis=0)
        depth = _at(f_depth, slot, best)
        rank = _at(f_rank, slot, best)
        parent = _at(f_parent, slot, best)
        base = tl.max(tl.where(slot == best, f_base, float("-inf")), axis=0)
        filled = score > float("-inf")
        row = tl.minimum(tl.maximum((depth - 1) * k + rank, 0), last)
        here = node == i
        tokens = tl.where(here, tl.where(filled, tl.load(ids_ptr + row), -1), tokens)
        parents = tl.where(here, tl.where(filled, parent, 0), parents)
        depths = tl.where(here, tl.where(filled, depth, 1), depths)
        scores = tl.where(here, score, scores)
        above = tl.where(filled, parent, i)
        line = tl.max(tl.where(node[:, None] == above, ancestors, 0), axis=0) | \
            tl.max(tl.where(node[:, None] == i, ancestors, 0), axis=0)
        ancestors = tl.where(node[:, None] == i, line[None, :], ancestors)
        f_score = tl.where(slot == best, float("-inf"), f_score)
        # its next sibling (same parent, rank + 1) and its first child (depth + 1, rank 0)
        sib_ok = filled & (rank + 1 < k)
        sib = base + tl.load(logp_ptr + tl.minimum(tl.maximum((depth - 1) * k + rank + 1, 0), last))
        child_ok = filled & (depth < depth_max)
        child = score + tl.load(logp_ptr + tl.minimum(tl.maximum(depth * k, 0), last))
        s, c = slot == 2 * i - 1, slot == 2 * i
        pushed = tl.where(c, tl.where(child_ok, child, float("-inf")), f_score)
        f_score = tl.where(s, tl.where(sib_ok, sib, float("-inf")), pushed)
        f_depth = tl.where(s, depth, tl.where(c, depth + 1, f_depth))
        f_rank = tl.where(s, rank + 1, tl.where(c, 0, f_rank))
        f_parent = tl.where(s, parent, tl.where(c, i, f_parent))
        f_base = tl.where(s, base, tl.where(c, score, f_base))
    ok = node < n_nodes
    tl.store(tokens_ptr + node, tokens, mask=ok)
    tl.store(parents_ptr + node, parents, mask=ok)
    tl.store(depths_ptr + node, depths, mask=ok)
    tl.store(scores_ptr + node, scores, mask=ok)
    tl.store(ancestors_ptr + node[:, None] * n_nodes + node[None, :], ancestors.to(tl.int8),
             mask=ok[:, None] & ok[None, :])


def tree_build(anchor, logp, ids, budget):
    """Triton: same contract as `tree_build_ref`, one launch of one program."""
    device = logp.device
    depth_max, k = logp.shape
    logp, ids = logp.contiguous(), ids.contiguous()
    tokens, parents, depths = (torch.empty(budget, dtype=torch.int64, device=device) for _ in range(3))
    scores = torch.empty(budget, dtype=torch.float32, device=device)
    ancestors = torch.empty((budget, budget), dtype=torch.int8, device=device)
    bn = max(2, triton.next_power_of_2(budget))
    _build_kernel[(1,)](anchor, logp, ids, tokens, parents, depths, ancestors, scores, budget, depth_max, k, BN=bn,
                        BS=max(2, triton.next_power_of_2(2 * budget + 1)))
    return tokens, parents, depths, ancestors.view(torch.bool), scores


@triton.jit(do_not_specialize=["n_nodes", "depth_max"])
def _verdict_kernel(tokens_ptr, parents_ptr, targets_ptr, packed_ptr, path_ptr, count_ptr, bonus_ptr, n_nodes,
                    depth_max, BN: tl.constexpr):
    """The walk, and along it what `tree_verdict_ref` packs: packed = [accepted | targets[path] | path's tokens |
    ranks of path[1..] | children of path[0..]] (each of the walk_record's counts over the tree's filled nodes)."""
    b = depth_max + 1
    node = tl.arange(0, BN)
    inside = (node > 0) & (node < n_nodes)  # the root is its own parent
    tokens = tl.load(tokens_ptr + node, mask=inside, other=-1)
    parents = tl.load(parents_ptr + node, mask=inside, other=-1)
    filled = inside & (tokens >= 0)
    current = tl.zeros((), tl.int64)
    alive = current == 0
    accepted = tl.zeros((), tl.int64)
    for d in range(depth_max + 1):
        want = tl.load(targets_ptr + current)
        tl.store(path_ptr + d, current)
        tl.store(packed_ptr + 1 + d, want)
        tl.store(packed_ptr + 1 + b + d, tl.load(tokens_ptr + current))
        tl.store(packed_ptr + 1 + 3 * b - 1 + d, tl.sum((filled & (parents == current)).to(tl.int64), axis=0))
        if d > 0:  # its rank: the filled siblings before it
            parent = tl.load(parents_ptr + current)
            older = filled & (parents == parent) & (node < current)
            tl.store(packed_ptr + 2 * b + d, tl.sum(older.to(tl.int64), axis=0))
        if d < depth_max:
            match = inside & (parents == current) & (tokens == want)
            child = tl.min(tl.where(match, node, BN), axis=0).to(tl.int64)  # the first matching node
            found = alive & (child < BN)
            current = tl.where(found, child, current)
            alive = found
            accepted += found.to(tl.int64)
        else:
            tl.store(bonus_ptr, want)
    tl.store(packed_ptr, accepted)
    tl.store(count_ptr, accepted + 1)


def tree_verdict(tokens, parents, targets, depth_max):
    """Triton: same contract as `tree_verdict_ref`, one launch of one program."""
    device = targets.device
    b = depth_max + 1
    packed = torch.empty(4 * b, dtype=torch.int64, device=device)
    path = torch.empty(b, dtype=torch.int64, device=device)
    count, bonus = torch.empty(1, dtype=torch.int64, device=device), torch.empty(1, dtype=torch.int64, device=device)
    _verdict_kernel[(1,)](tokens, parents, targets.contiguous(), packed, path, count, bonus, tokens.shape[0],
                          depth_max, BN=max(2, triton.next_power_of_2(tokens.shape[0])))
    return packed, path, count.view(()), bonus


# ---- the verify's mask --------------------------------------------------------------------------------------
def tree_mask_ref(ancestors: torch.Tensor, depths: torch.Tensor, length: torch.Tensor, capacity: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For a verify of N nodes written at cache rows length .. length + N - 1 (ancestors [N, N] bool, depths
    [N], length 0-d on the device): (mask [N, capacity] bool: the committed keys and each node's ancestors and
    itself; key positions [capacity] int64: a slot's position, nodes' rows at length + depth)."""
    n, device = ancestors.shape[0], length.device
    slots = torch.arange(capacity, device=device)
    rows = length + torch.arange(n, device=device)
    mask = (slots < length).view(1, capacity).expand(n, capacity).clone()
    mask.index_copy_(1, rows, ancestors)
    key_positions = slots.index_copy(0, rows, length + depths)
    return mask, key_positions


@triton.jit
def _mask_kernel(ancestors_ptr, depths_ptr, length_ptr, mask_ptr, keys_ptr, n_nodes, capacity, BN: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One block of BLOCK cache slots, every node's row of it."""
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    node = tl.arange(0, BN)
    length = tl.load(length_ptr)
    j = slot - length  # the node whose row the slot is, where 0 <= j < n_nodes
    new = (j >= 0) & (j < n_nodes) & (slot < capacity)
    ancestor = tl.load(ancestors_ptr + node[:, None] * n_nodes + j[None, :],
                       mask=(node < n_nodes)[:, None] & new[None, :], other=0)
    seen = (slot < length)[None, :] | (ancestor != 0)
    tl.store(mask_ptr + node[:, None] * capacity + slot[None, :], seen.to(tl.int8),
             mask=(node < n_nodes)[:, None] & (slot < capacity)[None, :])
    depth = tl.load(depths_ptr + j, mask=new, other=0)
    tl.store(keys_ptr + slot, tl.where(new, length + depth, slot.to(tl.int64)), mask=slot < capacity)


def tree_mask(ancestors, depths, length, capacity):
    """Triton: same contract as `tree_mask_ref`, one launch."""
    n, device = ancestors.shape[0], length.device
    mask = torch.empty((n, capacity), dtype=torch.int8, device=device)
    keys = torch.empty(capacity, dtype=torch.int64, device=device)
    bn = max(2, triton.next_power_of_2(n))
    block = max(16, min(256, 4096 // bn))
    _mask_kernel[(triton.cdiv(capacity, block),)](ancestors.contiguous().view(torch.int8), depths, length.reshape(1),
                                                  mask, keys, n, capacity, BN=bn, BLOCK=block)
    return mask.view(torch.bool), keys
