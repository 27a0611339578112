"""A drafted tree's best-first build and the target's walk down it, one launch each (kernels/tree_build.py):
the reference's tree and walk, bit for bit, at every budget and depth, with ties, unfilled nodes (a budget past
every prefix) and more nodes than candidates per position."""
import pytest
import torch

from dflash_cli import tree as trees
from dflash_cli.kernels.tree_build import tree_build, tree_build_ref, tree_walk, tree_walk_ref

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


@pytest.mark.parametrize("budget, depth", [(8, 3), (16, 7), (32, 15), (5, 1)])
def test_the_walk_is_the_references_bit_for_bit(seed, budget, depth):
    """Targets that follow a random node's path and then leave it, and targets that match nothing."""
    logp, ids = _candidates(seed, depth, 32, budget, peaked=2.0)
    tree = trees.Tree(*tree_build_ref(torch.tensor([3], device=DEVICE), logp, ids, budget))
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        targets = torch.randint(0, 32, (budget,), generator=g).to(DEVICE)
        node = int(torch.randint(0, budget, (1,), generator=g))
        while node > 0 and int(tree.tokens[node]) >= 0:  # lead the walk down to `node`
            targets[tree.parents[node]] = tree.tokens[node]
            node = int(tree.parents[node])
        got, want = tree_walk(tree.tokens, tree.parents, targets, depth), tree_walk_ref(tree.tokens, tree.parents,
                                                                                         targets, depth)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}, trial {trial}"
        assert got[1].shape == () and got[0].shape == (depth + 1,)


def test_the_engine_takes_the_kernels_under_dflash_kernels_triton(monkeypatch):
    """tree.build and tree.walk dispatch through ops: the kernels on the kernel path, the references on a CPU."""
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert ops._pick("tree_build", torch.device("cpu")) is tree_build
    assert ops._pick("tree_walk", torch.device("cpu")) is tree_walk
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert ops._pick("tree_build", torch.device("cpu")) is tree_build_ref
