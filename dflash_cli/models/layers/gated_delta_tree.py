"""The Gated DeltaNet mixer over a drafted tree (dflash_cli/tree.py): each node's conv window and recurrent
state come from its own ancestors, not from the rows before it.

Node i at depth d (parents precede children; the root is the anchor, at depth 0) sees the committed
tokens, then its ancestors at depths 0..d-1, then itself. So its conv window is the last K-1 of
[committed conv inputs | its ancestors' inputs], gathered by index (fixed shapes, no host read), and its
recurrent state is its parent's after the parent's update (the root's parent: the committed state).

A node's q, k, v, g and beta come from the chain's prologue (kernels/gdn_glue.py) over its own window,
and the rule runs down the tree in one pass (kernels/gated_delta_tree.py) with the chain's step and norm.
Nothing is written through: like a chain's verify block, every node records its conv input and its
(k, v, g, beta). A node's records
depend only on its own path, so once the walk picks a path, `RecurrentCache.commit` with
`CommitPlan.path` gathers the path's rows to the front and replays them as it replays a chain's
accepted rows: with projections that round a row alike whatever M is (the kernel path), the state after
the commit is a fresh prefill's, bit for bit.

The tree's shape is read from the step's ancestor mask (the columns of the nodes' cache rows): node i's
ancestors are the nodes it may attend to, its depth their count less one, its parent the last of them
before itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops


@dataclass(frozen=True)
class TreeShape:
    """What every linear layer of one tree verify gathers by, computed once per forward."""

    parents: torch.Tensor  # [N] int64, the root's 0
    windows: torch.Tensor  # [N, K] int64: each node's conv window, as rows of [committed K-1 inputs | nodes]


def tree_shape(step, keep: int) -> TreeShape:
    """The tree of a tree verify's nodes, read from its mask, and each node's conv window of `keep` + 1
    rows: row K-1-m holds its ancestor m levels up (m <= depth) or, above the root, the committed input
    m - depth back. Kept on the step: every linear layer of the forward shares it. An unfilled node
    (tree.py: never walked to) has only itself as ancestor; what it computes is never used."""
    cached = getattr(step, "_gated_delta_tree", None)
    if cached is not None:
        return cached
    shape = TreeShape(*ops.gdn_tree_windows(step.mask, step.rows, keep))  # one launch (kernels/gated_delta_tree.py)
    step._gated_delta_tree = shape
    return shape


def gated_delta_tree(mixer, h: torch.Tensor, cache, step) -> torch.Tensor:
    """`GatedDeltaNet.__call__` for a tree verify (`step.mask` set): h [N, H] -> [N, H], recorded per node
    for the commit. The chain's prologue, each node over its own conv window (so a node's q, k, v, g and
    beta are the chain's for the same token and window, bit for bit), then the rule down the tree with the
    chain's per-step arithmetic and gated norm (kernels/gated_delta_tree.py)."""
    s, n, j, rec = mixer.shape, h.shape[0], mixer.slot, cache.rec
    tree = tree_shape(step, rec.conv.shape[1])
    proj = mixer.in_proj(h)  # [mixed | z | b | a]
    k, v, g, beta, x = (r[j, :n] for r in (rec.rec_k, rec.rec_v, rec.rec_g, rec.rec_beta, rec.rec_x))
    q = ops.gdn_prologue(proj, rec.conv[j], mixer.conv, mixer.a_log, mixer.dt_bias, s.heads_k, k, v, g, beta, x,
                         windows=tree.windows)
    z = proj[:, s.conv_dim:s.conv_dim + s.value_dim]
    out = ops.gdn_tree_rule_norm(q, k, v, g, beta, rec.state[j], tree.parents, s.dk**-0.5, z, mixer.norm.weight,
                                 mixer.norm.eps)
    return mixer.out_proj(out.reshape(n, -1))
