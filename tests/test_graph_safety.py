"""A CUDA graph capture that fails midway: checked on the CPU. (That every family's captured step never
reads back to the host, and that one make_fx record of it replayed every iteration gives the eager
tokens: tests/test_conformance.py.)

The attention reference slices the cache at `int(kv_len)`, so here it is replaced by the same attention
masked on the device over the whole cache, as in the conformance checks.
"""
from __future__ import annotations

import pytest
import torch

from dflash_cli import graphs as graphs_module
from dflash_cli import ops
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import STORY_PROMPTS
from .fake_cuda import attention_masked_on_device, stand_in

SAMPLINGS = [SamplingParams()]


@pytest.fixture(autouse=True)
def device_masked_attention(monkeypatch):
    monkeypatch.setattr(ops, "attention", attention_masked_on_device)


def _tokens(engine: Engine, prompt: list[int], sampling: SamplingParams, n: int = 48) -> list[int]:
    return [t for s in engine.generate(Request(prompt, n, sampling=sampling)) for t in s.tokens]


def test_a_capture_that_fails_midway_leaves_the_caches_as_they_were(stories_model, monkeypatch):
    """A capture whose warm-up raises after the step committed (out of memory, say) must not leave
    the target cache ahead of the drafter's: the engine falls back to eager execution and still
    writes exactly the target's tokens."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    want = _tokens(Engine(m.target, m.drafter), prompt, SAMPLINGS[0])
    failures = []

    def capture_that_fails(fn, after=None, pool=None, stream=None):
        fn()  # a warm-up run: it drafts, verifies, commits, and adds drafter context
        failures.append(True)
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(graphs_module, "capture", capture_that_fails)
    got = []
    with stand_in():  # the GPU branch, where graphs are on
        engine = Engine(m.target, m.drafter, lookahead=False)
        assert engine.graphs.enabled
        for step in engine.generate(Request(prompt, 48, sampling=SAMPLINGS[0])):
            got += step.tokens
            if not step.prefill and step.finish is None:  # committed: the prompt and every token but the bonus
                assert int(engine.target_cache.length) == int(engine.draft_cache.length) == len(prompt) + len(got) - 1
    assert failures and not engine.graphs.enabled  # it failed, and the engine fell back to eager
    assert got == want
