"""Speculative output is the target's own output: greedy token for token, sampling in distribution."""
from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats
from transformers import AutoModelForCausalLM

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import STORY_PROMPTS


def _generate(engine: Engine, prompt: list[int], n: int, stops=frozenset(), sampling=None):
    steps = list(engine.generate(Request(prompt, n, stops, sampling or SamplingParams())))
    return [t for s in steps for t in s.tokens], steps


def _random_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("pair_name", ["qwen3_pair", "llama_pair", "stories_pair"])
def test_greedy_speculative_output_equals_transformers_generate(pair_name, request):
    target_dir, drafter_dir = request.getfixturevalue(pair_name)
    model = loader.load(target_dir, drafter_dir, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    if pair_name == "stories_pair":
        prompts = [model.tokenizer.encode(p) for p in STORY_PROMPTS[:4]] + _random_prompts(4, 512, 7)
    else:
        prompts = _random_prompts(8, model.target.cfg.vocab_size, seed=len(pair_name))
    block_sizes = [b for b in (1, 2, 4, 16) if b <= model.drafter.cfg.block_size] + [model.drafter.cfg.block_size]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for b in sorted(set(block_sizes)):
            got, _ = _generate(Engine(model.target, model.drafter, block_size=b, max_context=200), prompt, 48)
            assert got == expected, f"block size {b}, prompt {prompt}"


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


def test_seeded_sampling_is_identical_with_and_without_speculation(stories_model):
    """Noise is keyed by sequence position, so a seed fixes the answer whatever the block size."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[1])
    for seed in range(3):
        sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        plain = _plain(m, prompt, 40, sampling=sampling)
        for b in (2, 8):
            got, _ = _generate(Engine(m.target, m.drafter, block_size=b), prompt, 40, sampling=sampling)
            assert got == plain


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
