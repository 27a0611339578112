"""The sampler's distribution and its edge cases (test_accept.py holds the kernel-vs-reference sweeps).

Gumbel-max over hashed noise must draw from the processed target distribution (temperature, then
top-k, top-p on the renormalised top-k set, min-p). Here the expected probabilities are computed
independently, in float64, from the definitions (not with the reference's own filter), and
20000 reference draws per filter set are compared by chi-square goodness-of-fit tests; the kernel
draws exactly what the reference draws (test_accept.py), so the result carries over to it.

False alarms: each chi-square acceptance fails a correct sampler with probability ALPHA = 1e-4;
this file makes 5 of them, so a correct sampler fails a run with probability 5e-4. Each test also
checks its power on the same draws: the distribution at 1.5× the temperature must be rejected
(see the test's docstring for the margin).
"""
import pytest
import torch
from scipy import stats

from dflash_cli.kernels.accept import U_MAX, sample, sample_ref, uniform_noise

from .conftest import DEVICE

ALPHA = 1e-4


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> torch.Tensor:
    """The processed distribution of one row, float64, straight from the definitions."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    if top_k:
        p[order[top_k:]] = 0
        p = p / p.sum()
    if top_p < 1.0:
        ranked = p[order]
        p[order[ranked.cumsum(0) - ranked >= top_p]] = 0  # dropped: the mass ranked above it reaches top_p
        p = p / p.sum()
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0
        p = p / p.sum()
    return p


def chi_square_p(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the draws under `probs`; 0 when a token outside its support was drawn."""
    counts = torch.bincount(draws.cpu(), minlength=probs.numel()).double()
    support = probs.cpu() > 0
    if counts[~support].sum() > 0:
        return 0.0
    return float(stats.chisquare(counts[support].numpy(), (probs.cpu()[support] * len(draws)).numpy()).pvalue)


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.03),
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_reference_draws_follow_the_processed_distribution(seed, params):
    """20000 draws (distinct rows give independent noise) of one 24-token distribution.

    The logits are evenly spread (a shuffled ramp from 4 to -4, jittered), so that every filter set
    keeps several tokens: fully random logits can leave top-p a single token, where a chi-square has
    one bin and a temperature error changes nothing (over 300 seeds: 4 or more tokens kept, largest
    p-value of the wrong temperature 3e-20)."""
    vocab, n = 24, 20000
    base = torch.linspace(4.0, -4.0, vocab)[torch.randperm(vocab)].to(DEVICE) + 0.3 * torch.randn(vocab, device=DEVICE)
    rows = torch.arange(n, device=DEVICE) + 7919 * (seed % 100_000)
    draws = sample_ref(base.expand(n, vocab), rows, seed=seed, **params)
    assert chi_square_p(draws, expected_probs(base, **params)) > ALPHA, f"seed {seed}"
    wrong = expected_probs(base, **(params | {"temperature": params["temperature"] * 1.5}))
    assert chi_square_p(draws, wrong) < ALPHA, f"seed {seed}: the test cannot tell a 50% temperature error"


# u == 1 exactly came out of the noise for (seed 0, row 231889, token 42) before it was capped:
# its Gumbel noise was +inf, which made that token win whatever its logit, or, when it was
# filtered out (-inf), a NaN score that argmax picked.
ONE_SEED, ONE_ROW, ONE_TOKEN = 0, 231889, 42


def test_the_noise_stays_below_one():
    u = uniform_noise(ONE_SEED, torch.tensor([ONE_ROW], device=DEVICE), 64)
    assert u[0, ONE_TOKEN] == U_MAX and (u < 1).all() and (u > 0).all()


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=1.0, min_p=0.1)])
def test_a_token_at_the_top_noise_value_is_still_sampled_by_its_probability(seed, params):
    logits = torch.randn(2, 64, device=DEVICE)
    logits[:, ONE_TOKEN] = -100.0  # never sampled; filtered out under min-p
    rows = torch.tensor([ONE_ROW, ONE_ROW], device=DEVICE)
    want = sample_ref(logits, rows, seed=ONE_SEED, **params)
    got = sample(logits, rows, seed=ONE_SEED, **params)
    assert torch.equal(got, want) and (want != ONE_TOKEN).all(), f"seed {seed}"


def test_the_seed_tensor_is_read_when_the_kernel_runs(seed):
    """One launch (as a CUDA graph replays it) serves every seed written into the seed tensor."""
    logits = torch.randn(3, 1003, device=DEVICE) * 2
    rows = torch.randint(0, 1 << 30, (3,), device=DEVICE)
    seed_t = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for s in (seed, (seed * 2654435761) & 0xFFFFFFFF, 0xFFFFFFFF):
        seed_t.fill_(s)
        got = sample(logits, rows, temperature=0.8, seed=seed_t)
        assert torch.equal(got, sample_ref(logits, rows, temperature=0.8, seed=s)), f"seed {s}"
        assert torch.equal(got, sample(logits, rows, temperature=0.8, seed=s)), f"seed {s}: int and tensor differ"

