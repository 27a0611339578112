"""The hybrid commit's replay in one launch (kernels/gdn_replay.py): the state fla's masked replay computes
(kernels/gated_delta.replay, what the commit ran before), bit for bit, and the reference's."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd
from dflash_cli.kernels.gdn_replay import replay

from .conftest import DEVICE
from .test_gated_delta import _inputs


@pytest.mark.parametrize("count", [0, 1, 5, 8])
@pytest.mark.parametrize("n, t, hk, hv, dk, dv", [(4, 8, 2, 4, 16, 16), (2, 8, 1, 3, 32, 24)])
def test_the_replay_is_flas_masked_replay_bit_for_bit(seed, count, n, t, hk, hv, dk, dv):
    _, k, v, decay, beta, state = _inputs(n, t, hk, hv, dk, dv, torch.Generator().manual_seed(seed))
    got, fla, want = state.clone(), state.clone(), state.clone()
    replay(got, k, v, decay, beta, torch.tensor(count, device=DEVICE))
    gd.replay(fla, k, v, decay, beta, torch.tensor(count, device=DEVICE))
    gd.replay_ref(want, k, v, decay, beta, torch.tensor(count, device=DEVICE))
    assert torch.equal(got, fla), f"seed {seed}"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    if count == 0:
        assert torch.equal(got, state)


def test_the_replay_reads_a_block_recorded_in_a_larger_buffer(seed):
    """The cache records into [layers, B, ...] buffers and replays their first t rows (a strided view)."""
    _, k, v, decay, beta, state = _inputs(3, 8, 2, 4, 16, 16, torch.Generator().manual_seed(seed))
    got, want = state.clone(), state.clone()
    count = torch.tensor(3, device=DEVICE)
    replay(got, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], count)
    gd.replay(want, k[:, :5].contiguous(), v[:, :5].contiguous(), decay[:, :5].contiguous(),
              beta[:, :5].contiguous(), count)
    assert torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_the_commit_is_the_replay_and_the_conv_commit(seed, count):
    """One launch for the whole hybrid commit: the states bit for bit fla's masked replay, the conv windows bit
    for bit the conv-commit kernel's, from a block recorded in a larger buffer (its first 5 rows)."""
    from dflash_cli.kernels.gdn_replay import gdn_commit, gdn_commit_ref

    g = torch.Generator().manual_seed(seed)
    _, k, v, decay, beta, state = _inputs(3, 8, 2, 4, 16, 16, g)
    conv, x = torch.randn(3, 3, 40, generator=g).to(DEVICE), torch.randn(3, 8, 40, generator=g).to(DEVICE)
    count_t = torch.tensor(count, device=DEVICE)
    got, got_conv = state.clone(), conv.clone()
    gdn_commit(got, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], got_conv, x[:, :5], count_t)
    fla, fla_conv = state.clone(), conv.clone()
    gd.replay(fla, k[:, :5].contiguous(), v[:, :5].contiguous(), decay[:, :5].contiguous(), beta[:, :5].contiguous(),
              count_t)
    gd.conv_commit(fla_conv, x[:, :5], count_t)
    assert torch.equal(got, fla) and torch.equal(got_conv, fla_conv), f"seed {seed}"
    want, want_conv = state.clone(), conv.clone()
    gdn_commit_ref(want, k[:, :5], v[:, :5], decay[:, :5], beta[:, :5], want_conv, x[:, :5], count_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_conv, want_conv)
