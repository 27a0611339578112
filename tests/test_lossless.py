"""Speculative output is the target's own output, on the trained demo pair: every acceptance length, a
block cut by the token budget or a stop token, and sampling in distribution. (Greedy = transformers and
seeded sampling = plain decoding, for every family: tests/test_conformance.py.)"""
from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats

from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import STORY_PROMPTS


def _generate(engine: Engine, prompt: list[int], n: int, stops=frozenset(), sampling=None):
    steps = list(engine.generate(Request(prompt, n, stops, sampling or SamplingParams())))
    return [t for s in steps for t in s.tokens], steps


def test_fitted_drafter_exercises_every_acceptance_path(stories_model):
    m = stories_model
    engine = Engine(m.target, m.drafter)
    b = engine.block_size
    taus = set()
    for p in STORY_PROMPTS:
        _, steps = _generate(engine, m.tokenizer.encode(p), 64)
        taus |= {s.acceptance_length for s in steps if not s.prefill}
    assert 1 in taus and b in taus and any(1 < t < b for t in taus), taus


def _plain(m, prompt, n, stops=frozenset(), sampling=None):
    return _generate(Engine(m.target), prompt, n, stops, sampling)[0]


def test_full_block_accepted_at_the_end_of_generation(stories_model):
    """Cut the token budget inside a fully accepted block: output is still the plain prefix."""
    m = stories_model
    engine = Engine(m.target, m.drafter)
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    _, steps = _generate(engine, prompt, 80)
    produced = 0
    for s in steps:
        if not s.prefill and s.acceptance_length == engine.block_size:
            break
        produced += len(s.tokens)
    else:
        pytest.fail("no fully accepted block to cut")
    for budget in (produced + engine.block_size, produced + 3):  # at the block's end, and inside it
        got, steps = _generate(engine, prompt, budget)
        assert got == _plain(m, prompt, budget)
        assert len(got) == budget and steps[-1].finish == "length"


def test_stop_token_inside_an_accepted_block(stories_model):
    m = stories_model
    engine = Engine(m.target, m.drafter)
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    _, steps = _generate(engine, prompt, 80)
    block = next(s for s in steps if not s.prefill and s.acceptance_length >= 4)
    stop = block.tokens[2]  # a token committed from an accepted draft, mid-block
    got, steps = _generate(engine, prompt, 80, frozenset({stop}))
    plain = _plain(m, prompt, 80)
    assert got == plain[: plain.index(stop)]
    assert steps[-1].finish == "stop" and stop not in got


def _exact_pair_distribution(m, prompt, temperature, top_k):
    """p(x1, x2 | prompt) under the processed target distribution, computed directly."""
    from dflash_cli.kernels.accept import filtered_scores

    engine = Engine(m.target)
    probs = {}
    with torch.inference_mode():
        logits = engine._prefill(prompt)
        p1 = filtered_scores(logits, temperature, top_k, 1.0, 0.0).softmax(-1)[0]
        for x1 in torch.nonzero(p1).flatten().tolist():
            logits = engine._prefill(prompt + [x1])
            p2 = filtered_scores(logits, temperature, top_k, 1.0, 0.0).softmax(-1)[0]
            for x2 in torch.nonzero(p2).flatten().tolist():
                probs[(x1, x2)] = float(p1[x1] * p2[x2])
    return probs


def _chi_square_p(samples: list[tuple[int, int]], probs: dict) -> float:
    """Goodness of fit, bins with expected count < 5 merged into one."""
    n = len(samples)
    counts = {k: 0 for k in probs}
    for s in samples:
        counts[s] += 1  # a pair outside the support raises KeyError: a hard failure, as it should be
    big = [k for k in probs if probs[k] * n >= 5]
    observed = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
    expected = [probs[k] * n for k in big] + [n - sum(probs[k] * n for k in big)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    return scipy_stats.chisquare(observed, expected).pvalue


ALPHA = 1e-3  # false-alarm rate of each distribution test: one run in a thousand seed sets


@pytest.mark.slow
def test_sampled_speculative_tokens_follow_the_target_distribution(stories_model):
    """The first two tokens (the second comes out of an accept step) against the exact target
    distribution, over 1500 seeds. A wrong sampler (temperature off by 40%) must fail the same test."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    temperature, top_k = 1.0, 4
    probs = _exact_pair_distribution(m, prompt, temperature, top_k)
    engine = Engine(m.target, m.drafter)

    def draw(t: float) -> list[tuple[int, int]]:
        out = []
        for seed in range(1500):
            sampling = SamplingParams(temperature=t, top_k=top_k, seed=seed)
            tokens, steps = _generate(engine, prompt, 2, sampling=sampling)
            out.append(tuple(tokens[:2]))
        return out

    assert _chi_square_p(draw(temperature), probs) > ALPHA
    assert _chi_square_p(draw(temperature * 1.4), probs) < ALPHA
