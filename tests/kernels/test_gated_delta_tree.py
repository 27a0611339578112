"""The gated delta rule down a drafted tree (kernels/gated_delta_tree.py): the reference is the chain's rule
along each node's own path, and the kernel equals the reference; a node's output does not depend on the
rest of the tree (batch invariance, issue 24)."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd
from dflash_cli.kernels import gated_delta_tree as gt

from .conftest import DEVICE


def _tree(n: int, g: torch.Generator) -> torch.Tensor:
    """Random parents, each before its child (node 0 the root, its own parent)."""
    return torch.tensor([0] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])


def _inputs(n, hk, hv, dk, dv, g):
    q = gd.l2norm_ref(torch.randn(n, hk, dk, generator=g)).to(DEVICE)
    k = gd.l2norm_ref(torch.randn(n, hk, dk, generator=g)).to(DEVICE)
    v = torch.randn(n, hv, dv, generator=g).to(DEVICE)
    decay = (-torch.rand(n, hv, generator=g) * 2).to(DEVICE)
    beta = torch.rand(n, hv, generator=g).to(DEVICE)
    state = torch.randn(hv, dk, dv, generator=g).to(DEVICE)
    return q, k, v, decay, beta, state


def _path(parents: list[int], i: int) -> list[int]:
    nodes = [i]
    while nodes[-1] != 0:
        nodes.append(parents[nodes[-1]])
    return nodes[::-1]


@pytest.mark.parametrize("n, hk, hv, dk, dv", [(1, 2, 4, 16, 16), (9, 2, 4, 16, 16), (16, 1, 3, 32, 48),
                                               (12, 2, 2, 8, 24)])
def test_each_node_is_the_chain_rule_along_its_path_and_the_kernel_equals_it(seed, n, hk, hv, dk, dv):
    g = torch.Generator().manual_seed(seed)
    parents = _tree(n, g)
    q, k, v, decay, beta, state = _inputs(n, hk, hv, dk, dv, g)
    before = state.clone()
    want = gt.tree_rule_ref(q, k, v, decay, beta, state, parents.to(DEVICE), dk**-0.5)
    for i in range(n):
        p = torch.tensor(_path(parents.tolist(), i))
        chain, _ = gd.gated_delta_rule_ref(*(x[p][None] for x in (q, k, v, decay, beta)), state[None], dk**-0.5)
        assert torch.equal(want[i], chain[0, -1]), f"seed {seed}: node {i}"  # the same steps, in the same order
    got = gt.tree_rule(q, k, v, decay, beta, state, parents.to(DEVICE), dk**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(state, before), "a tree verify must not write the committed state"


def test_a_nodes_output_does_not_depend_on_the_rest_of_the_tree(seed):
    """Node i's output, bit for bit, whether launched in the whole tree or in its path alone."""
    g = torch.Generator().manual_seed(seed)
    n, hk, hv, dk, dv = 16, 2, 4, 16, 16
    parents = _tree(n, g)
    inputs = _inputs(n, hk, hv, dk, dv, g)
    whole = gt.tree_rule(*inputs[:5], inputs[5], parents.to(DEVICE), dk**-0.5)
    for i in (3, 9, 15):
        p = torch.tensor(_path(parents.tolist(), i))
        alone = gt.tree_rule(*(x[p] for x in inputs[:5]), inputs[5], torch.cat((p[:1] * 0, torch.arange(len(p) - 1))
                                                                                 ).to(DEVICE), dk**-0.5)
        assert torch.equal(whole[i], alone[-1]), f"seed {seed}: node {i}"
