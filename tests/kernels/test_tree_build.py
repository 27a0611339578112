"""A drafted tree's best-first build and the target's walk down it, one launch each (kernels/tree_build.py):
the reference's tree and walk, bit for bit, at every budget and depth, with ties, unfilled nodes (a budget past
every prefix) and more nodes than candidates per position."""
import pytest
import torch

from dflash_cli import tree as trees
from dflash_cli.kernels.tree_build import (tree_build, tree_build_ref, tree_mask, tree_mask_ref, tree_verdict,
                                           tree_verdict_ref)

from .conftest import DEVICE


def _candidates(seed: int, depth: int, vocab: int, budget: int, peaked: float = 1.0, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(depth, vocab, generator=g) * peaked
    if ties:  # equal log-probabilities across ranks and depths: the first maximal slot must win, as argmax's
        logits = logits.round()
    return trees.top_k(logits.to(DEVICE), trees.branching(budget, vocab))


@pytest.mark.parametrize("budget, depth, vocab, peaked, ties", [
    (2, 1, 8, 1.0, False), (5, 3, 16, 1.0, False), (8, 3, 64, 3.0, False), (16, 7, 64, 1.0, True),
    (32, 15, 100, 2.0, False), (16, 2, 3, 1.0, False),  # 3 ids at 2 depths: 12 prefixes, 4 nodes unfilled
    (12, 5, 5, 0.5, True), (48, 4, 200, 1.0, False)])
def test_the_built_tree_is_the_references_bit_for_bit(seed, budget, depth, vocab, peaked, ties):
    logp, ids = _candidates(seed, depth, vocab, budget, peaked, ties)
    anchor = torch.tensor([7], device=DEVICE)
    got = tree_build(anchor, logp, ids, budget)
    want = tree_build_ref(anchor, logp, ids, budget)
    for name, a, b in zip(("tokens", "parents", "depths", "ancestors", "scores"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"seed {seed}: {name}\n{a}\n{b}"
    tokens, parents = got[0], got[1]
    if vocab ** depth + 1 < budget:  # fewer prefixes than nodes: the rest unfilled
        assert (tokens == -1).sum() == budget - 1 - sum(vocab ** d for d in range(1, depth + 1))
    assert bool((parents[1:] < torch.arange(1, budget, device=DEVICE)).all())  # parents precede children


@pytest.mark.parametrize("budget, depth, vocab", [(8, 3, 32), (16, 7, 32), (32, 15, 32), (5, 1, 32), (16, 2, 3)])
def test_the_verdict_is_the_walk_and_the_engines_readback_bit_for_bit(seed, budget, depth, vocab):
    """Targets that follow a random node's path and then leave it, and targets that match nothing: the path,
    the packed readback (accepted, the target's tokens and the node ids along the path, adaptive.walk_record's
    ranks and children), the commit count and the next bonus, as the reference's (the engine's torch ops)."""
    from dflash_cli.adaptive import read_walk

    logp, ids = _candidates(seed, depth, vocab, budget, peaked=2.0)
    tree = trees.Tree(*tree_build_ref(torch.tensor([3], device=DEVICE), logp, ids, budget))
    g = torch.Generator().manual_seed(seed)
    deepest = 0
    for trial in range(8):
        targets = torch.randint(0, vocab, (budget,), generator=g).to(DEVICE)
        node = int(torch.randint(0, budget, (1,), generator=g))
        while node > 0 and int(tree.tokens[node]) >= 0:  # lead the walk down to `node`
            targets[tree.parents[node]] = tree.tokens[node]
            node = int(tree.parents[node])
        got, want = tree_verdict(tree.tokens, tree.parents, targets, depth), tree_verdict_ref(
            tree.tokens, tree.parents, targets, depth)
        for name, a, b in zip(("packed", "path", "count", "bonus"), got, want):
            assert a.shape == b.shape and torch.equal(a, b), f"seed {seed}, trial {trial}: {name}\n{a}\n{b}"
        packed = got[0].tolist()
        accepted = packed[0]
        deepest = max(deepest, accepted)
        assert int(got[2]) == accepted + 1 and int(got[3][0]) == packed[1 + accepted]
        read_walk(packed[1 + 2 * (depth + 1):], accepted)  # the engine's reader takes it
    assert deepest > 0  # the led walks descended


@pytest.mark.parametrize("budget, length, capacity", [(8, 0, 40), (16, 21, 40), (5, 300, 310), (48, 100, 700)])
def test_the_mask_is_the_references_bit_for_bit(seed, budget, length, capacity):
    """The committed keys, each node's ancestors at its cache row, nothing past them; key positions: a slot's own,
    a node's row at length + depth."""
    logp, ids = _candidates(seed, 6, 64, budget)
    tree = trees.Tree(*tree_build_ref(torch.tensor([3], device=DEVICE), logp, ids, budget))
    at = torch.tensor(length, device=DEVICE)
    got, want = tree_mask(tree.ancestors, tree.depths, at, capacity), tree_mask_ref(tree.ancestors, tree.depths, at,
                                                                                     capacity)
    assert got[0].dtype == torch.bool and torch.equal(got[0], want[0]), f"seed {seed}"
    assert torch.equal(got[1], want[1]), f"seed {seed}"
    assert bool(got[0][:, :length].all()) and not bool(got[0][:, length + budget:].any())


def test_the_engine_takes_the_kernels_under_dflash_kernels_triton(monkeypatch):
    """tree.build and tree.walk dispatch through ops: the kernels on the kernel path, the references on a CPU."""
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert ops._pick("tree_build", torch.device("cpu")) is tree_build
    assert ops._pick("tree_verdict", torch.device("cpu")) is tree_verdict
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert ops._pick("tree_build", torch.device("cpu")) is tree_build_ref
