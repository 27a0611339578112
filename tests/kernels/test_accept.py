import pytest
import torch
from scipy import stats

from dflash_cli.kernels import accept as kernels
from dflash_cli.kernels.accept import accept, accept_ref, filtered_scores, sample, sample_ref, verdict_ref

from dflash_cli.sampling import Mode

from .conftest import DEVICE

PARAMS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02),
]
ids = lambda p: ",".join(f"{k}={v}" for k, v in p.items())  # noqa: E731


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 128 tokens with 8 candidates each: a 1000-token row takes every path that a
    152k-token row takes with the production sizes (many chunks; kept sets inside and beyond the
    candidates)."""
    monkeypatch.setattr(kernels, "CHUNK", 128)
    monkeypatch.setattr(kernels, "CANDIDATES", 8)


@pytest.mark.parametrize("vocab, dtype, chunks", [(1000, torch.float32, "default"), (1003, torch.bfloat16, "default"),
                                                  (1003, torch.float32, "small")])
@pytest.mark.parametrize("params", PARAMS, ids=ids)
@pytest.mark.slow
def test_sample_is_the_reference_sample_for_a_fixed_seed(seed, vocab, dtype, chunks, params, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    logits = (torch.randn(4, vocab, device=DEVICE) * 3).to(dtype)
    rows = torch.randint(0, 10_000, (4,), device=DEVICE)
    got = sample(logits, rows, seed=seed, **params)
    want = sample_ref(logits, rows, seed=seed, **params)
    assert torch.equal(got, want), f"seed {seed}"


def test_a_device_seed_draws_what_the_same_int_seed_draws(seed):
    logits = torch.randn(3, 500, device=DEVICE) * 2
    rows = torch.arange(3, device=DEVICE) + 40
    params = dict(temperature=0.8, top_p=0.9)
    got = sample(logits, rows, seed=torch.tensor(seed, device=DEVICE), **params)
    assert torch.equal(got, sample(logits, rows, seed=seed, **params)), f"seed {seed}"
    assert torch.equal(got, sample_ref(logits, rows, seed=seed, **params)), f"seed {seed}"


# Rows whose kept sets fit the candidates (peaked logits, few tokens kept) and rows whose kept sets
# do not (flat logits under top-p/min-p): `exact` says which path each row must take.
PATHS = [
    (dict(temperature=1.0, top_k=5), [12.0, 3.0, 0.05], [1, 1, 1]),  # 5 tokens never fill 8 candidates
    (dict(temperature=1.0, top_p=0.9), [12.0, 0.05], [1, 0]),
    (dict(temperature=1.0, min_p=0.05), [12.0, 0.05], [1, 0]),
    (dict(temperature=0.8, top_k=5, top_p=0.95, min_p=0.01), [12.0, 0.05], [1, 1]),
    (dict(temperature=1.0, top_k=300, top_p=0.95, min_p=0.01), [12.0, 0.05], [0, 0]),  # top-p needs all 300
    (dict(temperature=1.0, top_k=300), [12.0], [0]),  # 300 tokens cannot fit 8 chunks × 8 candidates
    (dict(temperature=1.0, top_k=300, min_p=0.05), [12.0], [1]),  # ... but min-p drops all but a few
]


@pytest.mark.parametrize("params, scales, exact", PATHS, ids=[ids(p[0]) for p in PATHS])
@pytest.mark.slow
def test_filtered_sampling_over_many_chunks_on_both_paths(seed, small_chunks, params, scales, exact):
    vocab = 1000
    logits = torch.randn(len(scales), vocab, device=DEVICE) * torch.tensor(scales, device=DEVICE)[:, None]
    rows = torch.randint(0, 10_000, (len(scales),), device=DEVICE)
    trace = torch.full((len(scales),), -1, dtype=torch.int32, device=DEVICE)
    values = (params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0), params.get("min_p", 0.0))
    got = kernels._sample(logits, rows, False, Mode.of(*values), *values, seed, trace=trace)
    assert trace.tolist() == exact, f"seed {seed}: path taken {trace.tolist()}, expected {exact}"
    assert torch.equal(got, sample_ref(logits, rows, seed=seed, **params)), f"seed {seed}"


@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.slow
def test_every_token_tied_at_the_top_k_boundary_is_kept(seed, chunks, request):
    """Integer logits tie everywhere; the reference keeps all ties with the k-th score, and so must
    the kernel (the Gumbel noise then decides among them, identically)."""
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    logits = torch.randint(0, 8, (4, 1000), device=DEVICE).float()
    rows = torch.randint(0, 10_000, (4,), device=DEVICE)
    for params in (dict(temperature=1.0, top_k=10), dict(temperature=0.5, top_k=3, min_p=0.2)):
        assert torch.equal(sample(logits, rows, seed=seed, **params),
                           sample_ref(logits, rows, seed=seed, **params)), f"seed {seed}, {params}"


def test_greedy_takes_the_first_maximal_index(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 1024)
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[0, [10, 4097, 4999]] = 5.0  # equal maxima in different vocabulary chunks
    logits[1, 4999] = 1.0
    assert sample(logits, torch.arange(2, device=DEVICE), temperature=0.0).tolist() == [10, 4999]


ALPHA = 1e-4  # false-alarm rate of each distribution test


def _draw_p_value(seed: int, n: int, filters: dict, temperature: float) -> float:
    """n draws at `temperature` from one row of logits (distinct positions give independent
    noise), against the exact filtered softmax at T=1: a chi-square goodness-of-fit p-value."""
    vocab = 16
    base = torch.linspace(3.0, -3.0, vocab, device=DEVICE)[torch.randperm(vocab, device=DEVICE)]
    rows = torch.arange(n, device=DEVICE) + 7919 * (seed % 1000)
    f = dict(top_k=0, top_p=1.0, min_p=0.0) | filters
    probs = filtered_scores(base[None], 1.0, f["top_k"], f["top_p"], f["min_p"]).softmax(-1)[0].double()
    draws = sample(base.expand(n, vocab).contiguous(), rows, temperature=temperature, seed=seed, **filters)
    counts = torch.bincount(draws, minlength=vocab).double()
    kept = probs > 0
    if temperature == 1.0:
        assert counts[~kept].sum() == 0, f"seed {seed}: sampled a filtered token"
    expected, observed = probs[kept] * n, counts[kept]
    small = expected < 5  # pool sparse cells, as the chi-square approximation wants
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = expected * observed.sum() / expected.sum()
    return stats.chisquare(observed.cpu().numpy(), expected.cpu().numpy()).pvalue


@pytest.mark.parametrize("filters", [dict(top_k=6), dict(top_p=0.8), dict(min_p=0.05)], ids=ids)
@pytest.mark.slow
def test_samples_follow_the_processed_distribution(seed, filters):
    assert _draw_p_value(seed, 400, filters, 1.0) > ALPHA, f"seed {seed}"


@pytest.mark.slow
def test_the_distribution_test_rejects_a_wrong_temperature(seed):
    """The same test at T=2 instead of 1 fails (power ~1 at this size: 1000/1000 simulated seeds)."""
    assert _draw_p_value(seed, 800, dict(min_p=0.02), 2.0) < ALPHA, f"seed {seed}"


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)], ids=ids)
def test_accept_counts_agreement_and_leaves_the_cache_length(seed, params):
    b, vocab = 8, 300
    logits = torch.randn(b, vocab, device=DEVICE) * 4
    length = torch.tensor(int(torch.randint(0, 1000, (1,))), device=DEVICE)
    y = sample_ref(logits, length + torch.arange(b, device=DEVICE), seed=seed, **params)
    for agree in (0, 3, b - 1):  # rejected at once, partly accepted, the whole block accepted
        block = torch.randint(0, vocab, (b,), device=DEVICE)
        block[1:agree + 1] = y[:agree]
        if agree < b - 1:
            block[agree + 1] = (y[agree] + 1) % vocab
        got_len, want_len = length.clone(), length.clone()
        got_y, got_a = accept(logits, block, got_len, seed=seed, **params)
        want_y, want_a = accept_ref(logits, block, want_len, seed=seed, **params)
        assert torch.equal(got_y, want_y), f"seed {seed}, agree {agree}: {got_y} != {want_y}"
        assert int(got_a) == int(want_a) == agree, f"seed {seed}: accepted {int(got_a)}, {int(want_a)}, {agree}"
        assert int(got_len) == int(want_len) == int(length), f"seed {seed}: committing is the model's job"


@pytest.mark.parametrize("params", PARAMS[1:], ids=ids)
def test_device_tensor_values_draw_what_the_same_numbers_draw(seed, params):
    """The engine keeps the sampling values on the device (one captured graph per mode serves every
    value): the kernel and the reference must read them there and draw exactly the numbers' sample."""
    logits = torch.randn(5, 700, device=DEVICE) * 3
    rows = torch.randint(0, 10_000, (5,), device=DEVICE)
    full = dict(top_k=0, top_p=1.0, min_p=0.0) | params
    mode = Mode.of(full["temperature"], full["top_k"], full["top_p"], full["min_p"])
    tensors = {k: torch.tensor(v, device=DEVICE, dtype=torch.int64 if k == "top_k" else torch.float32)
               for k, v in full.items()}
    want = sample_ref(logits, rows, seed=seed, **params)
    assert torch.equal(sample(logits, rows, seed=seed, mode=mode, **tensors), want), f"seed {seed}"
    assert torch.equal(sample_ref(logits, rows, seed=seed, mode=mode, **tensors), want), f"seed {seed}"


@pytest.mark.parametrize("params", [PARAMS[0], PARAMS[1], pytest.param(PARAMS[6], marks=pytest.mark.slow)], ids=ids)
def test_a_row_samples_the_same_token_alone_or_in_any_block(seed, params, small_chunks):
    """Issue 24: each row's chunk winners and thresholds are reduced by its own programs, in an order fixed
    by the vocabulary alone, so a verify row draws the token its decode step draws (bf16 logits, positions
    as the accept rule keys them; blocks of 2..32 rows)."""
    from .invariance import first_variant_row

    logits = (torch.randn(16, 600, device=DEVICE) * 3).to(torch.bfloat16)
    rows = torch.arange(16, device=DEVICE) + 100
    assert first_variant_row(lambda a, b: (sample(logits[a:b], rows[a:b], seed=seed, **params),), rows=16,
                             blocks=(3, 16)) is None, f"seed {seed}"


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)], ids=ids)
def test_the_verdict_packs_what_accept_returns(seed, params):
    """The engine's packed result: [a, y, block], the commit count a + 1 and the next bonus y_a, written by
    accept's own launches, equal to the reference's for every agreement length."""
    b, vocab = 6, 300
    logits = torch.randn(b, vocab, device=DEVICE) * 4
    length = torch.tensor(int(torch.randint(0, 1000, (1,))), device=DEVICE)
    y = sample_ref(logits, length + torch.arange(b, device=DEVICE), seed=seed, **params)
    for agree in (0, 2, b - 1):
        block = torch.randint(0, vocab, (b,), device=DEVICE)
        block[1:agree + 1] = y[:agree]
        if agree < b - 1:
            block[agree + 1] = (y[agree] + 1) % vocab
        got, want = kernels.verdict(logits, block, length, seed=seed, **params), verdict_ref(logits, block, length,
                                                                                           seed=seed, **params)
        assert got.packed.tolist() == want.packed.tolist() == [agree, *y.tolist(), *block.tolist()]
        assert int(got.count) == int(want.count) == agree + 1 and got.count.dim() == want.count.dim() == 0
        assert got.bonus.tolist() == want.bonus.tolist() == [int(y[agree])]
        assert int(got.accepted) == agree and torch.equal(got.y, y)


def test_device_sampling_values_are_read_in_place():
    """DeviceSampling keeps temperature, top_p and min_p in one buffer: the sampler reads that buffer (a view,
    no stack), and a device seed is not masked by a launch of its own."""
    from dflash_cli.sampling import DeviceSampling, SamplingParams

    s = DeviceSampling(torch.device(DEVICE))
    s.load(SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, seed=3))
    values = kernels._values(s.temperature, s.top_p, s.min_p, s.values.device)
    assert values.data_ptr() == s.values.data_ptr() and values.tolist() == pytest.approx([0.7, 0.9, 0.05])
    assert kernels._values(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(0.0), "cpu").tolist() == [0.5, 1.0, 0.0]
    assert kernels._seed_tensor(s.seed, s.seed.device).data_ptr() == s.seed.data_ptr()
