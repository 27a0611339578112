"""The hybrid commit's replay in one launch (kernels/gdn_replay.py): the state the rule itself leaves
(kernels/gdn_glue.gdn_rule_norm written through, a prefill chunk's or a decode step's), bit for bit, and the
reference's (tests/kernels/test_gdn_glue.py checks a record's rows against the rule too)."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd
from dflash_cli.kernels import gdn_glue
from dflash_cli.kernels.gdn_replay import replay

from .conftest import DEVICE
from .test_gated_delta import _inputs


def _ruled(state, k, v, decay, beta, count):
    """Each layer's state after its first `count` rows through the rule, written through (gdn_rule_norm)."""
    out = state.clone()
    if count:
        for n in range(state.shape[0]):
            z = torch.zeros(count, v.shape[2] * v.shape[3], device=DEVICE)
            gdn_glue.gdn_rule_norm(*(x[n, :count].contiguous() for x in (k, k, v, decay, beta)), out[n],
                                   k.shape[-1]**-0.5, z, torch.ones(v.shape[3], device=DEVICE), 1e-6, True)
    return out


@pytest.mark.parametrize("count", [0, 1, 5, 8])
@pytest.mark.parametrize("n, t, hk, hv, dk, dv", [(4, 8, 2, 4, 16, 16), (2, 8, 1, 3, 32, 24)])
def test_the_replay_is_the_rules_state_bit_for_bit(seed, count, n, t, hk, hv, dk, dv):
    _, k, v, decay, beta, state = _inputs(n, t, hk, hv, dk, dv, torch.Generator().manual_seed(seed))
    got, want = state.clone(), state.clone()
    replay(got, k, v, decay, beta, torch.tensor(count, device=DEVICE))
    gd.replay_ref(want, k, v, decay, beta, torch.tensor(count, device=DEVICE))
    assert torch.equal(got, _ruled(state, k, v, decay, beta, count)), f"seed {seed}"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    if count == 0:
        assert torch.equal(got, state)


def test_the_replay_reads_a_block_recorded_in_a_larger_buffer(seed):
    """The cache records into [layers, B, ...] buffers and replays their first t rows (a strided view)."""
    _, k, v, decay, beta, state = _inputs(3, 8, 2, 4, 16, 16, torch.Generator().manual_seed(seed))
    got, want = state.clone(), state.clone()
    count = torch.tensor(3, device=DEVICE)
    replay(got, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], count)
    replay(want, k[:, :5].contiguous(), v[:, :5].contiguous(), decay[:, :5].contiguous(),
           beta[:, :5].contiguous(), count)
    assert torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_the_commit_is_the_replay_and_the_conv_commit(seed, count):
    """One launch for the whole hybrid commit: the states bit for bit the rule's, the conv windows bit for bit
    the conv-commit kernel's, from a block recorded in a larger buffer (its first 5 rows)."""
    from dflash_cli.kernels.gdn_replay import gdn_commit, gdn_commit_ref

    g = torch.Generator().manual_seed(seed)
    _, k, v, decay, beta, state = _inputs(3, 8, 2, 4, 16, 16, g)
    conv, x = torch.randn(3, 3, 40, generator=g).to(DEVICE), torch.randn(3, 8, 40, generator=g).to(DEVICE)
    count_t = torch.tensor(count, device=DEVICE)
    got, got_conv = state.clone(), conv.clone()
    gdn_commit(got, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], got_conv, x[:, :5], count_t)
    ruled, ruled_conv = _ruled(state, k, v, decay, beta, count), conv.clone()
    gd.conv_commit(ruled_conv, x[:, :5], count_t)
    assert torch.equal(got, ruled) and torch.equal(got_conv, ruled_conv), f"seed {seed}"
    want, want_conv = state.clone(), conv.clone()
    gdn_commit_ref(want, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], want_conv, x[:, :5], count_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_conv, want_conv)


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_a_tree_commit_gathers_its_path_in_the_launch_bit_for_bit(seed, count):
    """A tree's accepted path (rows 0, 2, 5, 7 of a block recorded in a larger buffer): the one launch reads
    the path's rows by index, and leaves the states and conv windows of the same commit over those rows
    copied to the front (the gather it replaces), bit for bit; the records are not written."""
    from dflash_cli.kernels.gdn_replay import gdn_commit, gdn_commit_ref

    g = torch.Generator().manual_seed(seed)
    _, k, v, decay, beta, state = _inputs(3, 10, 2, 4, 16, 16, g)
    conv, x = torch.randn(3, 3, 40, generator=g).to(DEVICE), torch.randn(3, 10, 40, generator=g).to(DEVICE)
    path, count_t = torch.tensor([0, 2, 5, 7], device=DEVICE), torch.tensor(count, device=DEVICE)
    records = [r[:, :8] for r in (k, v, decay, beta, x)]
    before = [r.clone() for r in records]
    got, got_conv = state.clone(), conv.clone()
    rk, rv, rg, rb, rx = records
    gdn_commit(got, rk, rv, rg, rb, got_conv, rx, count_t, path)
    front = [r.index_select(1, path).contiguous() for r in records]
    want, want_conv = state.clone(), conv.clone()
    gdn_commit(want, *front[:4], want_conv, front[4], count_t)
    assert torch.equal(got, want) and torch.equal(got_conv, want_conv), f"seed {seed}"
    assert all(torch.equal(r, b) for r, b in zip(records, before))
    if count:
        assert not torch.equal(got_conv, conv)  # the commit moved the window
    ref, ref_conv = state.clone(), conv.clone()
    gdn_commit_ref(ref, rk, rv, rg, rb, ref_conv, rx, count_t, path)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_conv, ref_conv)
