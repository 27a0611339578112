"""The mixture-of-experts kernels against their references, and batch invariance: a row's routing and
expert output are bit-identical whether it is alone or inside a block of 2..32 rows (a decode row and a
verify row must never part at a router tie)."""
import pytest
import torch

from dflash_cli.kernels import moe

from .conftest import DEVICE, TOL


def _weights(e, h, i, dtype, g):
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(DEVICE, dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(DEVICE, dtype)
    router = (torch.randn(e, h, generator=g) * 4 / h**0.5).to(DEVICE, dtype)
    return router, gate_up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 8, 16, 32, 37])  # 37: more rows than one expert slot holds (the fallback)
def test_experts_kernel_matches_the_reference(seed, dtype, t):
    g = torch.Generator().manual_seed(seed)
    router, gate_up, down = _weights(12, 64, 48, dtype, g)
    x = torch.randn(t, 64, generator=g).to(DEVICE, dtype)
    _, weights = moe.route_ref(x, router, 4, True)
    # Distinct experts per row (as top-k gives), expert 0 in every row: an expert hit by all T rows, and
    # with 12 experts and 4 per row, some hit by none.
    idx = torch.stack([torch.cat((torch.zeros(1, dtype=torch.int64), torch.randperm(11, generator=g)[:3] + 1))
                       for _ in range(t)]).to(DEVICE)
    got = moe.experts(x, gate_up, down, idx, weights)
    want = moe.experts_ref(x, gate_up, down, idx, weights)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_matches_the_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    router, _, _ = _weights(40, 200, 8, dtype, g)  # 40 experts: not a multiple of the block
    x = torch.randn(9, 200, generator=g).to(DEVICE, dtype)
    idx, w = moe.route(x, router, 8, True)
    want_idx, want_w = moe.route_ref(x, router, 8, True)
    assert torch.equal(idx, want_idx), f"seed {seed}"
    torch.testing.assert_close(w, want_w, **TOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_a_row_routes_and_computes_the_same_alone_or_in_any_block(seed, impl):
    """Bit-identical, not close: the same row alone and at every place inside blocks of 2..32."""
    route, experts = (moe.route_ref, moe.experts_ref) if impl == "reference" else (moe.route, moe.experts)
    g = torch.Generator().manual_seed(seed)
    router, gate_up, down = _weights(16, 64, 32, torch.float32, g)
    rows = torch.randn(32, 64, generator=g).to(DEVICE)
    alone = []
    for r in range(32):
        idx, w = route(rows[r:r + 1], router, 4, True)
        alone.append((idx, w, experts(rows[r:r + 1], gate_up, down, idx, w)))
    for size in (2, 3, 7, 16, 32):
        block = rows[:size]
        idx, w = route(block, router, 4, True)
        out = experts(block, gate_up, down, idx, w)
        for r in range(size):
            assert torch.equal(idx[r:r + 1], alone[r][0]), f"seed {seed}: routing of row {r} in a block of {size}"
            assert torch.equal(w[r:r + 1], alone[r][1]), f"seed {seed}: weights of row {r} in a block of {size}"
            assert torch.equal(out[r:r + 1], alone[r][2]), f"seed {seed}: output of row {r} in a block of {size}"


def test_slots_are_fixed_shape_and_cover_every_pair():
    idx = torch.tensor([[3, 1], [1, 7], [3, 0]], device=DEVICE)
    order, expert, start, count = moe._slots(idx, 16)
    assert expert.shape == (6,) and sorted(expert[expert >= 0].tolist()) == [0, 1, 3, 7]
    pairs = idx.reshape(-1)
    for s in range(6):
        if expert[s] >= 0:
            members = order[start[s]:start[s] + count[s]]
            assert (pairs[members] == expert[s]).all()
    assert int(count.sum()) == 6
