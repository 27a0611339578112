import pytest
import torch
from scipy import stats

from dflash_cli.kernels.accept import accept, accept_ref, filtered_scores, sample, sample_ref

from .conftest import DEVICE

PARAMS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("vocab", [1000, 1003])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("tensor_seed", [False, True])
def test_sample_is_the_reference_sample_for_a_fixed_seed(seed, vocab, params, tensor_seed):
    logits = torch.randn(4, vocab, device=DEVICE) * 3
    rows = torch.randint(0, 10_000, (4,), device=DEVICE)
    s = torch.tensor(seed, device=DEVICE) if tensor_seed else seed
    got = sample(logits, rows, seed=s, **params)
    want = sample_ref(logits, rows, seed=seed, **params)
    assert torch.equal(got, want), f"seed {seed}"


def test_greedy_takes_the_first_maximal_index():
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[0, [10, 4097, 4999]] = 5.0  # equal maxima in different vocabulary chunks
    logits[1, 4999] = 1.0
    assert sample(logits, torch.arange(2, device=DEVICE), temperature=0.0).tolist() == [10, 4999]


ALPHA = 1e-4  # false-alarm rate of the distribution test


def test_samples_follow_the_processed_distribution(seed):
    """2000 draws (distinct rows give independent noise) against the exact min-p-filtered softmax;
    a chi-square goodness-of-fit test at ALPHA. A 30% temperature error must be rejected."""
    vocab, n = 24, 2000
    base = torch.randn(vocab, device=DEVICE) * 1.5
    rows = torch.arange(n, device=DEVICE) + 7919 * (seed % 1000)
    probs = filtered_scores(base[None], 1.0, 0, 1.0, 0.03).softmax(-1)[0].double()
    keep = probs > 0

    def p_value(temperature: float) -> float:
        draws = sample(base.expand(n, vocab).contiguous(), rows, temperature=temperature, min_p=0.03, seed=seed)
        counts = torch.bincount(draws, minlength=vocab)
        assert counts[~keep].sum() == 0 or temperature != 1.0, f"seed {seed}: sampled a filtered token"
        observed = counts[keep].double()
        expected = probs[keep] / probs[keep].sum() * observed.sum()
        return stats.chisquare(observed.cpu().numpy(), expected.cpu().numpy()).pvalue

    assert p_value(1.0) > ALPHA, f"seed {seed}"
    assert p_value(1.3) < ALPHA, f"seed {seed}"


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)])
def test_accept_counts_agreement_and_advances_the_cache_length(seed, params):
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
        assert torch.equal(got_y, want_y) and int(got_a) == int(want_a) == agree, f"seed {seed}"
        assert int(got_len) == int(want_len) == int(length) + agree + 1


def test_noise_never_reaches_one():
    """The largest hash value must not round u up to 1.0 (that would be +inf Gumbel noise)."""
    from dflash_cli.kernels.accept import U_MAX, uniform_noise

    u = uniform_noise(0, torch.arange(64), 1 << 16)
    assert float(u.max()) <= U_MAX < 1.0 and float(u.min()) > 0.0
    h = torch.tensor([(1 << 24) - 1], dtype=torch.float32)
    assert float((h + 0.5) * (1.0 / (1 << 24))) == 1.0  # the rounding the cap guards against
