"""The attention kernel on a tree verify (issue 28): node t, at position length + depth(t) with its K/V at cache
row length + t, sees the committed keys and its ancestors. Its output equals the masked reference, and is the bits
of decoding its own path (the path's K/V at rows length + depth), in fp32 and bf16: what makes a tree's node logits
those of plain decoding."""
import pytest
import torch

from dflash_cli import tree as trees
from dflash_cli.kernels.attention import SPLIT, attention, attention_ref

from .conftest import DEVICE, TOL


def _tree(budget: int, depth: int, seed: int) -> trees.Tree:
    g = torch.Generator().manual_seed(seed)
    return trees.build(torch.tensor([1]), torch.randn(depth, 6, generator=g), budget)


def _setup(tree, length, hq, hkv, d, capacity, dtype):
    n = tree.budget
    q = torch.randn(n, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    v = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    k[:, length + n:] = float("nan")  # never read
    v[:, length + n:] = float("nan")
    mask, key_positions = trees.attention_mask(tree, torch.tensor(length), capacity)
    return q, k, v, mask, length + tree.depths, key_positions


def _path(tree, i: int) -> list[int]:
    nodes = [i]
    while nodes[-1] != 0:
        nodes.append(int(tree.parents[nodes[-1]]))
    return nodes[::-1]


def _decode_path(q, k, v, tree, i, length, kw):
    """Node i as plain decoding computes it: its path's K/V at rows length .. length + depth, nothing after."""
    path = torch.tensor(_path(tree, i))
    k2, v2 = k.clone(), v.clone()
    k2[:, length:] = float("nan")
    v2[:, length:] = float("nan")
    k2[:, length:length + len(path)] = k[:, length + path]
    v2[:, length:length + len(path)] = v[:, length + path]
    return attention(q[i:i + 1], k2, v2, torch.tensor(length + len(path), device=DEVICE), causal=True, **kw)[0]


# (budget, drafted depth, committed length, heads, kv heads, head size, window, sinks): the new rows across a key
# tile and the first split boundary; gpt-oss's window and sinks; a budget past 32 queries
CASES = {
    "gqa4": (16, 5, SPLIT - 7, 8, 2, 32, None, False),
    "window sinks": (12, 4, SPLIT - 3, 16, 2, 16, 9, True),
    "budget 40": (40, 6, 70, 4, 2, 16, None, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_each_tree_node_is_the_bits_of_decoding_its_path(seed, dtype, case):
    budget, depth, length, hq, hkv, d, window, sinks = CASES[case]
    tree = _tree(budget, depth, seed)
    assert int(tree.depths.max()) >= 3 and len(set(tree.parents.tolist())) > 2  # a tree, not a chain
    q, k, v, mask, positions, key_positions = _setup(tree, length, hq, hkv, d, SPLIT + 100, dtype)
    kw = dict(scale=d**-0.5, sliding_window=window, sinks=torch.randn(hq, device=DEVICE) * 2 if sinks else None)
    kv_len = torch.tensor(length + budget, device=DEVICE)
    got = attention(q, k, v, kv_len, causal=True, tree=(mask, positions), **kw)
    assert torch.equal(attention(q, k, v, kv_len, causal=True, tree=(mask, positions), one_launch=False, **kw), got)
    ref_mask = mask if window is None else mask & (positions[:, None] - key_positions[None, :] < window)
    assert not got.isnan().any()
    want = attention_ref(q, k.nan_to_num(), v.nan_to_num(), kv_len, causal=True, scale=kw["scale"], sinks=kw["sinks"],
                         mask=ref_mask)  # (the reference multiplies every slot's values, weight 0 or not)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    bad = [i for i in range(budget) if not torch.equal(got[i], _decode_path(q, k, v, tree, i, length, kw))]
    assert not bad, f"seed {seed}: nodes whose output differs from decoding their path: {bad}"


def test_the_ancestor_mask_is_what_the_kernel_reads(seed):
    """Dropping one ancestor from a node's mask row changes that node's output and no other node's."""
    tree = _tree(10, 4, seed)
    q, k, v, mask, positions, _ = _setup(tree, 40, 4, 2, 16, 300, torch.float32)
    kv_len = torch.tensor(40 + 10)
    node = int(tree.depths.argmax())
    parent = int(tree.parents[node])
    before = attention(q, k, v, kv_len, causal=True, scale=0.25, tree=(mask, positions))
    cut = mask.clone()
    cut[node, 40 + parent] = False
    after = attention(q, k, v, kv_len, causal=True, scale=0.25, tree=(cut, positions))
    changed = [i for i in range(10) if not torch.equal(before[i], after[i])]
    assert changed == [node]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rope_cache_kernel_writes_a_trees_nodes_at_their_rows(seed, dtype):
    """A tree's nodes are rotated at their positions (length + depth, repeated among siblings) and written at
    their own cache rows (length + node): the kernel as its reference, the K bits those of a node written
    alone at its position (what decoding its path writes), and no other row touched."""
    from dflash_cli.kernels.rope_cache import qk_norm_rope_cache, qk_norm_rope_cache_ref
    from dflash_cli.rope import rope_table

    from .conftest import nan_like

    tree, length, hq, hkv, d = _tree(10, 4, seed), 20, 4, 2, 32
    positions, rows = length + tree.depths, length + torch.arange(10)
    cos_sin = rope_table(d, 10000.0, None, 64, DEVICE)
    q, k, v = (torch.randn(10, h, d, dtype=dtype, device=DEVICE) for h in (hq, hkv, hkv))
    norms = [torch.randn(d, dtype=dtype, device=DEVICE) for _ in range(2)]
    caches = [nan_like((hkv, 64, d), dtype) for _ in range(4)]
    got = qk_norm_rope_cache(q, k, v, *norms, 1e-6, cos_sin, positions, caches[0], caches[1], rows=rows)
    want = qk_norm_rope_cache_ref(q, k, v, *norms, 1e-6, cos_sin, positions, caches[2], caches[3], rows=rows)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, **TOL[dtype])
    assert torch.equal(caches[1][:, rows], caches[3][:, rows]) and caches[1][:, :length].isnan().all()
    for i in range(10):  # node i alone, written at its position
        alone = [nan_like((hkv, 64, d), dtype) for _ in range(2)]
        qk_norm_rope_cache(q[i:i + 1], k[i:i + 1], v[i:i + 1], *norms, 1e-6, cos_sin, positions[i:i + 1], *alone)
        assert torch.equal(alone[0][:, positions[i]], caches[0][:, rows[i]]), f"seed {seed}: node {i}"
