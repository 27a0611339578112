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

from . import ops


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
    token at depth d + 1), rooted at `anchor` ([1] id): the per-position top-K, then the `budget - 1` pops
    (ops.tree_build: one launch; the reference, kernels/tree_build.tree_build_ref, unrolls them)."""
    assert budget >= 1
    logp, ids = top_k(draft_logits, branching(budget, draft_logits.shape[-1]))
    return Tree(*ops.tree_build(anchor, logp, ids, budget))


def walk(tree: Tree, targets: torch.Tensor, depth_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow the target's tokens (`targets` [N]: its token at each node) from the root: at each node
    descend to the child holding the target's token, else stop there. Returns (path [depth_max + 1]:
    the visited nodes in order, the last one repeated past the stop; accepted: 0-d int64, the nodes
    descended to). The committed tokens are targets[path[: accepted + 1]]."""
    packed, path, _, _ = verdict(tree, targets, depth_max)
    return path, packed[0]


def verdict(tree: Tree, targets: torch.Tensor, depth_max: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`walk`, and what a tree iteration reads back and commits, in one launch (ops.tree_verdict): (packed:
    accepted, targets[path], the path's node tokens, then adaptive.walk_record; path; count: 0-d, accepted + 1;
    bonus [1]: the next anchor, targets at the stop node)."""
    return ops.tree_verdict(tree.tokens, tree.parents, targets, depth_max)


def attention_mask(tree: Tree, length: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a verify of the tree's nodes written at cache rows length .. length + N - 1: (mask [N, capacity]
    bool: the committed keys and each node's ancestors and itself; key positions [capacity]: a slot's
    position, nodes' rows at length + depth, for sliding windows). One launch (ops.tree_mask)."""
    return ops.tree_mask(tree.ancestors, tree.depths, length, capacity)
