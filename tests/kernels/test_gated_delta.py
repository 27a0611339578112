"""The hybrid family's linear-attention kernels against their torch references: fla-core's fused
recurrent gated delta rule (blocks; the commit's replay is kernels/gdn_glue.py's), our causal conv
and the conv-window commit at a device index. Prefill chunks over 64 tokens take fla's chunked kernel
(test_fla_chunk_matches_reference), which runs on a GPU only: its autotuner needs a GPU driver, and
Triton's interpreter cannot run it (a `.to()` on a Python loop index in fla's chunk_delta_h.py)."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd

from .conftest import DEVICE
from .invariance import first_variant_row


def _inputs(n, t, hk, hv, dk, dv, g):
    q = gd.l2norm_ref(torch.randn(n, t, hk, dk, generator=g)).to(DEVICE)
    k = gd.l2norm_ref(torch.randn(n, t, hk, dk, generator=g)).to(DEVICE)
    v = torch.randn(n, t, hv, dv, generator=g).to(DEVICE)
    decay = (-torch.rand(n, t, hv, generator=g) * 2).to(DEVICE)
    beta = torch.rand(n, t, hv, generator=g).to(DEVICE)
    state = torch.randn(n, hv, dk, dv, generator=g).to(DEVICE)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("n, t, hk, hv, dk, dv", [(1, 1, 2, 4, 16, 16), (1, 8, 2, 4, 16, 32), (3, 16, 1, 3, 32, 16)])
def test_fla_rule_matches_the_reference(seed, n, t, hk, hv, dk, dv):
    q, k, v, decay, beta, state = _inputs(n, t, hk, hv, dk, dv, torch.Generator().manual_seed(seed))
    before = state.clone()
    got, got_final = gd.gated_delta_rule(q, k, v, decay, beta, state, dk**-0.5)
    want, want_final = gd.gated_delta_rule_ref(q, k, v, decay, beta, state, dk**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(state, before), "a verify must not write the committed state"


# TF32: with fp32 inputs fla's chunked kernel runs its dots in TF32 (10-bit mantissa). Rounding only the
# inputs to TF32 moves the reference's outputs and states by about 1e-4 and 5e-4 here (values of order 0.3
# and 1); a wrong layout, chunk boundary or lost state moves them by their own size.
CHUNK_TOLERANCE = dict(rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(DEVICE == "cpu", reason="fla's chunked kernel runs on a GPU only: its autotuner needs a GPU "
                                            "driver, and Triton's interpreter fails on it (loop index .to() in "
                                            "fla/ops/common/chunk_delta_h.py)")
@pytest.mark.parametrize("t", [65, 200])  # one chunk of 64 and a token over it; four chunks, the last partial
def test_fla_chunk_matches_reference(seed, monkeypatch, t):
    """A prefill chunk over 64 tokens, as dflash calls it (gated_delta_rule picks fla's chunked kernel),
    at Qwen3.5's linear-attention heads (16 key, 48 value heads of 128), from a nonzero state and with
    a slow decay, so that the state carries across the kernel's 64-token chunks."""
    import fla.ops.gated_delta_rule as fla_rule

    called = []
    real = fla_rule.chunk_gated_delta_rule
    monkeypatch.setattr(fla_rule, "chunk_gated_delta_rule", lambda *a, **k: called.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(seed)
    q, k, v, _, beta, state = _inputs(1, t, 16, 48, 128, 128, g)
    decay = (-torch.rand(1, t, 48, generator=g) * 0.1).to(DEVICE)  # exp(g) in (0.9, 1]: a long memory
    before = state.clone()
    got, got_final = gd.gated_delta_rule(q, k, v, decay, beta, state, 128**-0.5)
    want, want_final = gd.gated_delta_rule_ref(q, k, v, decay, beta, state, 128**-0.5)
    assert called, "gated_delta_rule did not take fla's chunked kernel"
    torch.testing.assert_close(got, want, **CHUNK_TOLERANCE, msg=lambda m: f"seed {seed}, T={t}, outputs: {m}")
    torch.testing.assert_close(got_final, want_final, **CHUNK_TOLERANCE, msg=lambda m: f"seed {seed}, T={t}, state: {m}")
    assert torch.equal(state, before), "a prefill chunk's rule must not write the state it starts from"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, c, k", [(1, 96, 4), (16, 200, 4), (5, 1030, 3)])
def test_causal_conv_matches_the_reference(seed, dtype, t, c, k):
    window = torch.randn(k - 1 + t, c, device=DEVICE).to(dtype)
    weight = (torch.randn(c, k, device=DEVICE) / k**0.5).to(dtype)
    got, want = gd.causal_conv(window, weight), gd.causal_conv_ref(window, weight)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8])
def test_conv_commit_gathers_at_a_device_index(seed, count):
    n, keep, t, c = 3, 3, 8, 130
    conv = torch.randn(n, keep, c, device=DEVICE)
    x = torch.randn(n, t, c, device=DEVICE)
    got, want = conv.clone(), conv.clone()
    gd.conv_commit(got, x, torch.tensor(count, device=DEVICE))
    gd.conv_commit_ref(want, x, torch.tensor(count, device=DEVICE))
    assert torch.equal(got, want), f"seed {seed}, count {count}"
    assert torch.equal(got, torch.cat((conv, x), dim=1)[:, count:count + keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 16), (5, 3, 128), (4, 1, 100)], ids=lambda s: "x".join(map(str, s)))
def test_l2norm_kernel_matches_the_reference(seed, dtype, shape):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    got, want = gd.l2norm(x), gd.l2norm_ref(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 16), (5, 3, 128), (4, 1, 100)], ids=lambda s: "x".join(map(str, s)))
def test_gated_rms_norm_kernel_matches_the_reference(seed, dtype, shape):
    x, z = torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)
    w = torch.randn(shape[-1], device=DEVICE)  # float32, as the checkpoints' norm weights load
    got, want = gd.gated_rms_norm(x, z, w, 1e-6), gd.gated_rms_norm_ref(x, z, w, 1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_s_head_norms_are_the_same_alone_or_in_any_block(seed, dtype):
    """Bit-identical (issue 24): l2norm of q and k and the gated output norm of a token [heads, d] alone
    and inside blocks of 2..32 tokens, as a decode step and a verify block run them."""
    x, z = torch.randn(32, 4, 128, device=DEVICE).to(dtype), torch.randn(32, 4, 128, device=DEVICE).to(dtype)
    w = torch.randn(128, device=DEVICE)
    assert first_variant_row(lambda a, b: (gd.l2norm(x[a:b]), gd.gated_rms_norm(x[a:b], z[a:b], w, 1e-6))) is None, \
        f"seed {seed}"


def test_ops_takes_the_head_norm_kernels_with_kernels_on(seed, monkeypatch):
    from dflash_cli import ops

    x, z, w = torch.randn(3, 2, 16, device=DEVICE), torch.randn(3, 2, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert torch.equal(ops.l2norm(x), gd.l2norm(x)) and torch.equal(ops.gated_rms_norm(x, z, w, 1e-6),
                                                                    gd.gated_rms_norm(x, z, w, 1e-6))
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert torch.equal(ops.l2norm(x), gd.l2norm_ref(x)) and torch.equal(ops.gated_rms_norm(x, z, w, 1e-6),
                                                                        gd.gated_rms_norm_ref(x, z, w, 1e-6))


def test_the_check_catches_a_norm_whose_tree_follows_the_row_count(seed):
    """The invariance check has teeth: an l2norm that sums each row in halves when it shares the launch
    (a split chosen by the row count) is caught in bf16."""
    x = torch.randn(32, 4, 128, device=DEVICE).to(torch.bfloat16)

    def split_norm(a, b):
        xf = x[a:b].float()
        sq = xf * xf
        total = sq.sum(-1, keepdim=True) if b - a == 1 else sq[..., :64].sum(-1, keepdim=True) + sq[..., 64:].sum(-1, keepdim=True)
        return (xf * torch.rsqrt(total + 1e-6),)
    assert first_variant_row(split_norm) is not None, f"seed {seed}"
