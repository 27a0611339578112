"""The gated delta rule down a drafted tree, with the gated norm (kernels/gated_delta_tree.py): the reference
is the chain's rule along each node's own path, and the kernel equals the chain's kernel along that path bit
for bit (one recurrence arithmetic); a node's output does not depend on the rest of the tree (batch
invariance, issue 24)."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd
from dflash_cli.kernels import gated_delta_tree as gt
from dflash_cli.kernels import gdn_glue as gg

from .conftest import DEVICE, TOL


def _tree(n: int, g: torch.Generator) -> torch.Tensor:
    """Random parents, each before its child (node 0 the root, its own parent)."""
    return torch.tensor([0] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])


def _inputs(n, hk, hv, dk, dv, g, dtype=torch.float32):
    q = gd.l2norm_ref(torch.randn(n, hk, dk, generator=g)).to(DEVICE)
    k = gd.l2norm_ref(torch.randn(n, hk, dk, generator=g)).to(DEVICE)
    v = torch.randn(n, hv, dv, generator=g).to(DEVICE)
    decay = (-torch.rand(n, hv, generator=g) * 2).to(DEVICE)
    beta = torch.rand(n, hv, generator=g).to(DEVICE)
    state = torch.randn(hv, dk, dv, generator=g).to(DEVICE)
    proj = torch.randn(n, 2 * hv * dv, generator=g).to(dtype).to(DEVICE)
    z = proj[:, hv * dv:]  # a strided view, as the in-projection's z columns
    return q, k, v, decay, beta, state, z, torch.randn(dv, generator=g).to(DEVICE)


def _path(parents: list[int], i: int) -> list[int]:
    nodes = [i]
    while nodes[-1] != 0:
        nodes.append(parents[nodes[-1]])
    return nodes[::-1]


def _along(inputs, p, dk):
    """The chain's kernel (gdn_rule_norm) over the path p's rows, from the committed state."""
    q, k, v, decay, beta, state, z, w = inputs
    return gg.gdn_rule_norm(*(x[p].contiguous() for x in (q, k, v, decay, beta)), state.clone(), dk**-0.5, z[p], w,
                            1e-6, False)


def _along_ref(inputs, p, dk, hv, dv):
    """The chain's reference rule over the path p's rows, its last row through the gated norm alone (torch's
    CPU norm rounds a row by the number of rows beside it)."""
    q, k, v, decay, beta, state, z, w = inputs
    out, _ = gd.gated_delta_rule_ref(*(x[p][None] for x in (q, k, v, decay, beta)), state[None], dk**-0.5)
    return gd.gated_rms_norm_ref(out[0, -1:].to(z.dtype), z[p[-1:]].reshape(1, hv, dv), w, 1e-6)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, hk, hv, dk, dv", [(1, 2, 4, 16, 16), (9, 2, 4, 16, 16), (16, 1, 3, 32, 48),
                                               (12, 2, 2, 8, 24)])
def test_each_node_is_the_chain_rule_along_its_path_and_the_kernel_equals_it(seed, n, hk, hv, dk, dv, dtype):
    g = torch.Generator().manual_seed(seed)
    parents = _tree(n, g)
    inputs = _inputs(n, hk, hv, dk, dv, g, dtype)
    state = inputs[5]
    before = state.clone()
    want = gt.tree_rule_norm_ref(*inputs[:6], parents.to(DEVICE), dk**-0.5, *inputs[6:], 1e-6)
    got = gt.tree_rule_norm(*inputs[:6], parents.to(DEVICE), dk**-0.5, *inputs[6:], 1e-6)
    assert got.dtype == want.dtype == dtype
    for i in range(n):
        p = torch.tensor(_path(parents.tolist(), i))
        chain_ref = _along_ref(inputs, p, dk, hv, dv)
        assert torch.equal(want[i], chain_ref), f"seed {seed}: node {i}"  # the same steps, in the same order
        chain = _along(inputs, p, dk)
        assert torch.equal(got[i], chain[-1]), f"seed {seed}: node {i} rounds apart from the chain's kernel"
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(state, before), "a tree verify must not write the committed state"


def test_a_nodes_output_does_not_depend_on_the_rest_of_the_tree(seed):
    """Node i's output, bit for bit, whether launched in the whole tree or in its path alone."""
    g = torch.Generator().manual_seed(seed)
    n, hk, hv, dk, dv = 16, 2, 4, 16, 16
    parents = _tree(n, g)
    inputs = _inputs(n, hk, hv, dk, dv, g)
    whole = gt.tree_rule_norm(*inputs[:6], parents.to(DEVICE), dk**-0.5, *inputs[6:], 1e-6)
    for i in (3, 9, 15):
        p = torch.tensor(_path(parents.tolist(), i))
        chain_parents = torch.cat((p[:1] * 0, torch.arange(len(p) - 1))).to(DEVICE)
        alone = gt.tree_rule_norm(*(x[p].contiguous() for x in inputs[:5]), inputs[5], chain_parents, dk**-0.5,
                                  inputs[6][p], inputs[7], 1e-6)
        assert torch.equal(whole[i], alone[-1]), f"seed {seed}: node {i}"


def test_ops_takes_the_tree_kernel_with_kernels_on(monkeypatch):
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert ops._pick("tree_rule_norm", torch.device("cpu")) is gt.tree_rule_norm
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert ops._pick("tree_rule_norm", torch.device("cpu")) is gt.tree_rule_norm_ref


@pytest.mark.parametrize("n, keep, length", [(8, 3, 0), (16, 3, 5), (32, 3, 40), (12, 2, 7), (48, 4, 1)])
def test_the_tree_shape_is_read_from_the_mask_in_one_launch_as_the_reference(seed, n, keep, length):
    """Parents and each node's conv window (its ancestors, then the committed inputs above the root), from a tree
    verify's mask at its cache rows: the kernel's integers are the reference's; a node's window ends with itself."""
    from dflash_cli import tree as trees

    g = torch.Generator().manual_seed(seed)
    parents = _tree(n, g).to(DEVICE)
    ancestors = torch.eye(n, dtype=torch.bool, device=DEVICE)
    for i in range(1, n):
        ancestors[i] |= ancestors[int(parents[i])]
    tree = trees.Tree(torch.zeros(n, dtype=torch.int64, device=DEVICE), parents, ancestors.sum(1) - 1, ancestors,
                      torch.zeros(n, device=DEVICE))
    at = torch.tensor(length, device=DEVICE)
    mask, _ = trees.attention_mask(tree, at, length + n + 9)
    rows = at + torch.arange(n, device=DEVICE)
    got, want = gt.tree_windows(mask, rows, keep), gt.tree_windows_ref(mask, rows, keep)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"
    assert torch.equal(got[0][1:], parents[1:]) and torch.equal(got[1][:, -1], keep + torch.arange(n, device=DEVICE))
