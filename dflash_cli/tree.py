"""Tree verification (DDTree, research/dflash2.md §2): more tokens per target pass from the same drafter.

One drafter pass gives a distribution at every block position. Instead of its argmax chain, a tree of
`budget` nodes is verified: node 0 is the anchor (the bonus token, the last committed position's
successor), and the others are the best-first prefixes of the per-position top-K, by path
log-probability (the sum of the drafter's log q_t(x_t) along the path). The target runs over all
nodes at once, node i at position anchor + depth(i), with an ancestor-only mask: each node sees the
committed context, its ancestors and itself. The walk then follows the target's own token from the
root: descend to the child holding it, or emit it as the bonus. The target's token at a node is the
position-keyed sample (kernels/accept.py), which does not depend on the tree, so every committed token
is what plain decoding writes for the same seed, at every temperature.

Everything here has fixed shapes for a given (depth, budget) and reads nothing back to the host: the
best-first search is `budget - 1` unrolled pops from a fixed frontier (each pop pushes the popped
node's next sibling and its first child, which enumerates prefixes in score order, since siblings are
sorted and a child never outscores its parent), and the walk is `depth` unrolled steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Tree:
    """A drafted tree of `budget` nodes (node 0 the anchor), on the device."""

    tokens: torch.Tensor  # [N] int64: node 0 the anchor's id; an unfilled node (the budget past every prefix) -1
    parents: torch.Tensor  # [N] int64: node 0's is 0
    depths: torch.Tensor  # [N] int64: 0 for the anchor
    ancestors: torch.Tensor  # [N, N] bool: [i, j] = j is i or an ancestor of i
    scores: torch.Tensor  # [N] float32: path log-probability (0 for the anchor, -inf unfilled)

    @property
    def budget(self) -> int:
        return self.tokens.shape[0]


def top_k(draft_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the k most likely ids and their log-probabilities (fp32, sorted descending)."""
    logp = torch.log_softmax(draft_logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, ids


def branching(budget: int, vocab: int) -> int:
    """K: children per node considered (more than budget - 1 could never be used)."""
    return max(1, min(budget - 1, vocab))


def build(anchor: torch.Tensor, draft_logits: torch.Tensor, budget: int) -> Tree:
    """The best-first tree of `budget` nodes over the drafter's per-position logits [D, V] (row d: the
    token at depth d + 1), rooted at `anchor` ([1] id)."""
    assert budget >= 1
    device = draft_logits.device
    depth_max = draft_logits.shape[0]
    logp, ids = top_k(draft_logits, branching(budget, draft_logits.shape[-1]))
    k = logp.shape[1]
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
    return Tree(tokens, parents, depths, ancestors, scores)


def walk(tree: Tree, targets: torch.Tensor, depth_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow the target's tokens (`targets` [N]: its token at each node) from the root: at each node
    descend to the child holding the target's token, else stop there. Returns (path [depth_max + 1]:
    the visited nodes in order, the last one repeated past the stop; accepted: 0-d int64, the nodes
    descended to). The committed tokens are targets[path[: accepted + 1]]."""
    device = targets.device
    current = torch.zeros((), dtype=torch.int64, device=device)
    alive = torch.ones((), dtype=torch.bool, device=device)
    accepted = torch.zeros((), dtype=torch.int64, device=device)
    path = [current]
    for _ in range(depth_max):
        want = targets.index_select(0, current.view(1))
        match = ((tree.parents == current) & (tree.tokens == want))[1:]  # not the root (its own parent)
        found = match.any() & alive
        child = match.to(torch.int64).argmax() + 1  # the first matching node (ids are distinct among siblings)
        current = torch.where(found, child, current)
        alive = found
        accepted = accepted + found.to(torch.int64)
        path.append(current)
    return torch.stack(path), accepted


def attention_mask(tree: Tree, length: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a verify of the tree's nodes written at cache rows length .. length + N - 1: (mask [N, capacity]
    bool: the committed keys and each node's ancestors and itself; key positions [capacity]: a slot's
    position, nodes' rows at length + depth, for sliding windows)."""
    n, device = tree.budget, length.device
    slots = torch.arange(capacity, device=device)
    rows = length + torch.arange(n, device=device)
    mask = (slots < length).view(1, capacity).expand(n, capacity).clone()
    mask.index_copy_(1, rows, tree.ancestors)
    key_positions = slots.index_copy(0, rows, length + tree.depths)
    return mask, key_positions
