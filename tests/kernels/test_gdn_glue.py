"""The Gated DeltaNet glue in two launches (kernels/gdn_glue.py) against the torch chains it replaces, and
against the Triton kernels it fuses (the conv, l2norm and gated norm kernels, fla's fused recurrent rule):
the same values, rounded the same way, and a row's result the same alone or in any block."""
import pytest
import torch

from dflash_cli.kernels import gated_delta as gd
from dflash_cli.kernels import gdn_glue as gg

from .conftest import DEVICE, TOL
from .invariance import BLOCKS, first_variant_row

SHAPES = [(2, 4, 16, 32, 4, 5), (1, 3, 32, 16, 4, 1), (2, 2, 24, 40, 3, 8)]  # hk, hv, dk, dv, K, T
IDS = ["hk{}-hv{}-dk{}-dv{}-K{}-T{}".format(*s) for s in SHAPES]


def _layer(hk, hv, dk, dv, k, t, dtype, g, rows_before=0):
    """A layer's in-projection rows (rows_before more in front, for the invariance checks), conv window,
    conv weight, A_log and dt_bias."""
    c = 2 * hk * dk + hv * dv
    proj = torch.randn(rows_before + t, c + hv * dv + 2 * hv, generator=g).to(dtype).to(DEVICE)
    conv = torch.randn(k - 1, c, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(c, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    return proj, conv, weight, torch.randn(hv, generator=g).to(DEVICE), torch.randn(hv, generator=g).to(DEVICE)


def _records(t, hk, hv, dk, dv, c, dtype):
    """k, v, g, beta, x as a verify record's first rows: NaN, so an element left unwritten fails."""
    nan = lambda *shape, dtype=torch.float32: torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # noqa: E731
    return nan(t, hk, dk), nan(t, hv, dv), nan(t, hv), nan(t, hv), nan(t, c, dtype=dtype)


def _chain(proj, conv, weight, hk, dk, hv, dv):
    """q, k, v, x as the Triton kernels the prologue replaces compute them (kernels/gated_delta.py)."""
    c, t = conv.shape[1], proj.shape[0]
    qkv = gd.causal_conv(torch.cat((conv, proj[:, :c])), weight)
    q, k = (gd.l2norm(qkv[:, i * hk * dk:(i + 1) * hk * dk].reshape(t, hk, dk)) for i in (0, 1))
    return q, k, qkv[:, 2 * hk * dk:].reshape(t, hv, dv).float(), proj[:, :c]


@pytest.mark.parametrize("record", [True, False], ids=["verify", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_prologue_matches_the_torch_chain(seed, shape, dtype, record):
    hk, hv, dk, dv, k, t = shape
    proj, conv, weight, a_log, dt_bias = _layer(*shape, dtype, torch.Generator().manual_seed(seed))
    c = conv.shape[1]
    conv_before = conv.clone()
    got, want = _records(t, hk, hv, dk, dv, c, dtype), _records(t, hk, hv, dk, dv, c, dtype)
    if not record:
        got[4].fill_(0), want[4].fill_(0)
    x_got, x_want = (got[4], want[4]) if record else (None, None)
    q = gg.gdn_prologue(proj, conv, weight, a_log, dt_bias, hk, *got[:4], x_got)
    q_want = gg.gdn_prologue_ref(proj, conv, weight, a_log, dt_bias, hk, *want[:4], x_want)
    tol = TOL[dtype]
    for name, a, b in zip(("q", "k", "v", "g", "beta"), (q, *got[:4]), (q_want, *want[:4])):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"seed {seed}, {name}: {m}")
    assert torch.equal(got[4], want[4]), "the conv inputs are recorded as they are (nothing written without a record)"
    assert torch.equal(conv, conv_before), "the prologue reads the conv window, never writes it"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_prologue_rounds_as_the_kernels_it_replaces(seed, shape, dtype):
    """q, k, v and the record: bit for bit what the conv and l2norm kernels gave; g and beta (softplus and
    sigmoid in Triton's exp/log, not torch's) within a few ulps of torch's."""
    hk, hv, dk, dv, k, t = shape
    proj, conv, weight, a_log, dt_bias = _layer(*shape, dtype, torch.Generator().manual_seed(seed))
    got, want = _records(t, hk, hv, dk, dv, conv.shape[1], dtype), _records(t, hk, hv, dk, dv, conv.shape[1], dtype)
    q = gg.gdn_prologue(proj, conv, weight, a_log, dt_bias, hk, *got)
    gg.gdn_prologue_ref(proj, conv, weight, a_log, dt_bias, hk, *want)
    chain = _chain(proj, conv, weight, hk, dk, hv, dv)
    for name, a, b in zip(("q", "k", "v", "x"), (q, got[0], got[1], got[4]), chain):
        assert torch.equal(a, b), f"seed {seed}: {name} differs from the kernels it replaces"
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7, msg=lambda m: f"seed {seed}, g: {m}")
    beta_tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=2**-8)  # one bf16 ulp
    torch.testing.assert_close(got[3], want[3], **beta_tol, msg=lambda m: f"seed {seed}, beta: {m}")


def test_g_is_accurate_where_softplus_is_tiny_or_linear(seed):
    """softplus(a + dt_bias) from -60 to 60: log1p(exp(x)) for tiny exp(x) keeps its relative accuracy (a
    plain log(1 + e) would round to 0 below about -17), and past 20 it is x itself, as torch's."""
    hk, hv, dk, dv, k, t = 1, 64, 16, 16, 4, 2
    proj, conv, weight, a_log, _ = _layer(hk, hv, dk, dv, k, t, torch.float32, torch.Generator().manual_seed(seed))
    proj[:, -hv:] = torch.linspace(-60, 60, t * hv, device=DEVICE).reshape(t, hv)
    dt_bias = torch.zeros(hv, device=DEVICE)
    got, want = _records(t, hk, hv, dk, dv, conv.shape[1], torch.float32), _records(t, hk, hv, dk, dv, conv.shape[1],
                                                                                     torch.float32)
    gg.gdn_prologue(proj, conv, weight, a_log, dt_bias, hk, *got)
    gg.gdn_prologue_ref(proj, conv, weight, a_log, dt_bias, hk, *want)
    assert (want[2] != 0).all()
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0, msg=lambda m: f"seed {seed}: {m}")


def _prologue_rows(seed, dtype, rows, blocks):
    hk, hv, dk, dv, k = 1, 2, 32, 32, 4
    proj, conv, weight, a_log, dt_bias = _layer(hk, hv, dk, dv, k, rows, dtype, torch.Generator().manual_seed(seed))
    c = conv.shape[1]
    inputs = torch.cat((conv, proj[:, :c]))  # the conv inputs before row r: inputs[r : r + K-1]

    def step(a, b):
        out = _records(b - a, hk, hv, dk, dv, c, dtype)
        q = gg.gdn_prologue(proj[a:b], inputs[a:a + k - 1].contiguous(), weight, a_log, dt_bias, hk, *out)
        return (q, *out)

    return first_variant_row(step, rows, blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prologue_row_is_the_same_alone_or_in_a_block(seed, dtype):
    """Bit-identical (issue 24): row r of a sequence, its conv window the K-1 inputs before it, launched
    alone (a decode step) or at any place in a block of rows (a verify block)."""
    assert _prologue_rows(seed, dtype, 8, (2, 3, 8)) is None, f"seed {seed}"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prologue_row_is_the_same_alone_or_in_any_block(seed, dtype):
    """As above, in every block of 2..32 rows (tests/kernels/invariance.py's)."""
    assert _prologue_rows(seed, dtype, 32, BLOCKS) is None, f"seed {seed}"


def _rule_inputs(t, hk, hv, dk, dv, dtype, g):
    q = gd.l2norm_ref(torch.randn(t, hk, dk, generator=g)).to(DEVICE)
    k = gd.l2norm_ref(torch.randn(t, hk, dk, generator=g)).to(DEVICE)
    v = torch.randn(t, hv, dv, generator=g).to(DEVICE)
    decay = (-torch.rand(t, hv, generator=g) * 2).to(DEVICE)
    beta = torch.rand(t, hv, generator=g).to(DEVICE)
    state = torch.randn(hv, dk, dv, generator=g).to(DEVICE)
    proj = torch.randn(t, 3 * hv * dv, generator=g).to(dtype).to(DEVICE)
    z = proj[:, hv * dv:2 * hv * dv]  # a strided view, as the in-projection's z columns
    return q, k, v, decay, beta, state, z, torch.randn(dv, generator=g).to(DEVICE)


@pytest.mark.parametrize("write_state", [False, True], ids=["verify", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 4, 16, 16), (8, 2, 4, 16, 32), (16, 1, 3, 24, 40)],
                         ids=lambda s: "T{}-hk{}-hv{}-dk{}-dv{}".format(*s))
def test_rule_norm_matches_the_torch_chain(seed, shape, dtype, write_state):
    t, hk, hv, dk, dv = shape
    q, k, v, decay, beta, state, z, w = _rule_inputs(*shape, dtype, torch.Generator().manual_seed(seed))
    got_state, want_state = state.clone(), state.clone()
    got = gg.gdn_rule_norm(q, k, v, decay, beta, got_state, dk**-0.5, z, w, 1e-6, write_state)
    want = gg.gdn_rule_norm_ref(q, k, v, decay, beta, want_state, dk**-0.5, z, w, 1e-6, write_state)
    assert got.dtype == dtype and got.shape == (t, hv, dv)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    if write_state:
        torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        assert not torch.equal(got_state, state)
    else:
        assert torch.equal(got_state, state), "a verify block must not write the committed state"


@pytest.mark.skipif(DEVICE == "cpu", reason="fla's chunked kernel runs on a GPU only (see test_gated_delta.py)")
def test_a_prefill_chunk_over_64_rows_takes_the_chunked_rule(seed):
    """Past MAX_RULE_ROWS the rule is fla's chunked kernel (TF32 dots: test_gated_delta.py's tolerance), then
    the gated norm kernel; the state is written through all the same."""
    t, hk, hv, dk, dv = gg.MAX_RULE_ROWS + 1, 2, 4, 64, 64
    q, k, v, decay, beta, state, z, w = _rule_inputs(t, hk, hv, dk, dv, torch.float32,
                                                     torch.Generator().manual_seed(seed))
    got_state, want_state = state.clone(), state.clone()
    got = gg.gdn_rule_norm(q, k, v, decay, beta, got_state, dk**-0.5, z, w, 1e-6, True)
    want = gg.gdn_rule_norm_ref(q, k, v, decay, beta, want_state, dk**-0.5, z, w, 1e-6, True)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(got_state, want_state, rtol=1e-2, atol=1e-2, msg=lambda m: f"seed {seed}: {m}")


def test_rule_norm_equals_fla_then_the_gated_norm_kernel(seed):
    """The kernels it replaces (fla's fused recurrent rule, then _gated_rms_norm_kernel), in fp32."""
    t, hk, hv, dk, dv = 8, 2, 4, 16, 32
    q, k, v, decay, beta, state, z, w = _rule_inputs(t, hk, hv, dk, dv, torch.float32,
                                                     torch.Generator().manual_seed(seed))
    got = gg.gdn_rule_norm(q, k, v, decay, beta, state, dk**-0.5, z, w, 1e-6, False)
    out, _ = gd.gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None], state[None], dk**-0.5)
    want = gd.gated_rms_norm(out[0], z.reshape(t, hv, dv), w, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_block_through_the_rule_is_the_tokens_one_by_one(seed, dtype):
    """Bit-identical (issue 24): a verify block of T rows from the state gives each row what decoding its
    tokens one at a time (each step writing the state through) gives, and the same final state."""
    t, hk, hv, dk, dv = 16, 2, 4, 16, 32
    q, k, v, decay, beta, state, z, w = _rule_inputs(t, hk, hv, dk, dv, dtype, torch.Generator().manual_seed(seed))
    block_state, step_state = state.clone(), state.clone()
    block = gg.gdn_rule_norm(q, k, v, decay, beta, block_state, dk**-0.5, z, w, 1e-6, True)
    steps = torch.cat([gg.gdn_rule_norm(q[r:r + 1], k[r:r + 1], v[r:r + 1], decay[r:r + 1], beta[r:r + 1], step_state,
                                        dk**-0.5, z[r:r + 1], w, 1e-6, True) for r in range(t)])
    assert torch.equal(block, steps), f"seed {seed}"
    assert torch.equal(block_state, step_state), f"seed {seed}"


def test_ops_takes_the_glue_kernels_with_kernels_on(monkeypatch):
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert ops._pick("gdn_prologue", torch.device("cpu")) is gg.gdn_prologue
    assert ops._pick("gdn_rule_norm", torch.device("cpu")) is gg.gdn_rule_norm
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert ops._pick("gdn_prologue", torch.device("cpu")) is gg.gdn_prologue_ref
    assert ops._pick("gdn_rule_norm", torch.device("cpu")) is gg.gdn_rule_norm_ref


# ---- one recurrence arithmetic: the commit's replay (kernels/gdn_replay.py) and a tree node's prologue -----
@pytest.mark.parametrize("count", [1, 3, 6])
def test_a_replayed_state_is_the_rules_bit_for_bit(seed, count):
    """A verify row the commit replays updates the state exactly as the same row through the rule written
    through (a prefill chunk, a decode step): one arithmetic, so speculative and plain decoding keep the same
    recurrent state bit for bit. Read from a verify record's first rows (rows past T not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    n, t, hk, hv, dk, dv = 2, 6, 2, 4, 16, 32
    rec_k = gd.l2norm_ref(torch.randn(n, t + 2, hk, dk, generator=g)).to(DEVICE)
    rec_v = torch.randn(n, t + 2, hv, dv, generator=g).to(DEVICE)
    rec_g = (-torch.rand(n, t + 2, hv, generator=g) * 2).to(DEVICE)
    rec_beta = torch.rand(n, t + 2, hv, generator=g).to(DEVICE)
    state = torch.randn(n, hv, dk, dv, generator=g).to(DEVICE)
    from dflash_cli.kernels import gdn_replay

    replayed, committed = state.clone(), state.clone()
    gdn_replay.replay(replayed, rec_k[:, :t], rec_v[:, :t], rec_g[:, :t], rec_beta[:, :t],
                      torch.tensor(count, device=DEVICE))
    conv, x = torch.randn(n, 3, 40, generator=g).to(DEVICE), torch.randn(n, t + 2, 40, generator=g).to(DEVICE)
    gdn_replay.gdn_commit(committed, rec_k[:, :t], rec_v[:, :t], rec_g[:, :t], rec_beta[:, :t], conv, x[:, :t],
                          torch.tensor(count, device=DEVICE))
    z, w = torch.randn(count, hv * dv, generator=g).to(DEVICE), torch.randn(dv, generator=g).to(DEVICE)
    for layer in range(n):
        ruled = state[layer].clone()
        gg.gdn_rule_norm(*(r[layer, :count].contiguous() for r in (rec_k, rec_k, rec_v, rec_g, rec_beta)), ruled,
                         dk**-0.5, z, w, 1e-6, True)
        assert torch.equal(replayed[layer], ruled), f"seed {seed}, layer {layer}"
        assert torch.equal(committed[layer], ruled), f"seed {seed}, layer {layer}: the one-launch commit's"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_window_can_be_given_by_index(seed, dtype):
    """With `windows` (a tree's nodes), row t's conv window is the rows windows[t] of [conv | proj]: its q, k,
    v, g, beta are, bit for bit, those of the same token after the same K-1 inputs in a chain (the kernel);
    the reference agrees to the tolerance."""
    hk, hv, dk, dv, k, t = 2, 4, 16, 32, 4, 6
    proj, conv, weight, a_log, dt_bias = _layer(hk, hv, dk, dv, k, t, dtype, torch.Generator().manual_seed(seed))
    c = conv.shape[1]
    # rows of [conv (3) | proj (6)], the last of each the row itself (its own token)
    windows = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 5, 6], [2, 4, 6, 7], [0, 1, 2, 8]])
    got, want = _records(t, hk, hv, dk, dv, c, dtype), _records(t, hk, hv, dk, dv, c, dtype)
    q = gg.gdn_prologue(proj, conv, weight, a_log, dt_bias, hk, *got, windows=windows.to(DEVICE))
    q_want = gg.gdn_prologue_ref(proj, conv, weight, a_log, dt_bias, hk, *want, windows=windows.to(DEVICE))
    for name, a, b in zip(("q", "k", "v", "g", "beta"), (q, *got[:4]), (q_want, *want[:4])):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"seed {seed}, {name}: {m}")
    assert torch.equal(got[4], proj[:, :c]), "each row records its own conv input"
    inputs = torch.cat((conv, proj[:, :c]))
    for r in range(t):  # the chain: row r's K-1 window rows as the cached conv, then its own row
        out = _records(1, hk, hv, dk, dv, c, dtype)
        qr = gg.gdn_prologue(proj[r:r + 1], inputs[windows[r, :-1]].contiguous(), weight, a_log, dt_bias, hk, *out)
        chain = (qr[0], *(x[0] for x in out[:4]))
        for name, a, b in zip(("q", "k", "v", "g", "beta"), (q[r], *(x[r] for x in got[:4])), chain):
            assert torch.equal(a, b), f"seed {seed}: row {r}'s {name}"
