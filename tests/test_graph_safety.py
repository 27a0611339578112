"""The engine's device step is safe to capture as a CUDA graph: checked on the CPU.

A CUDA graph records the device work of one call and replays it; whatever the host computed
during capture (Python ints, branches, shapes) is frozen into it. So the captured step must (1)
never synchronise with the host (an `.item()`, the truth value of a tensor, a data-dependent
shape) and (2) give the right answer when the very same recorded operations are replayed on the
same buffers every iteration. Neither needs a GPU to check:

1. a dispatch mode sees every aten op of one step and fails on the ops that read device values
   back to the host (`_local_scalar_dense` is behind `.item()`, `int()`, `bool()`, `.tolist()`);
2. `make_fx` records one step as a fixed list of aten ops, with host values baked in just as a
   capture bakes them, over the engine's own tensors; replaying that trace for every iteration of
   a generation must give exactly the tokens of eager execution.

Both run the engine's torch path, with one substitution: the attention reference slices the cache
at `int(kv_len)` (cheap on a CPU, and the reason graphs are only used with the kernels), so here
it is replaced, for the eager run and the replayed one alike, by the same attention masked on the
device over the whole cache. tests/kernels/test_engine_kernels.py runs check 1 on the Triton path.
"""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dflash_cli import engine as engine_module
from dflash_cli import graphs as graphs_module
from dflash_cli import ops
from dflash_cli.engine import Engine, Request
from dflash_cli.graphs import EagerStep
from dflash_cli.sampling import SamplingParams

from .conftest import STORY_PROMPTS
from .fake_cuda import attention_masked_on_device, stand_in
from .host_reads import HostReads

SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=11)]
IDS = ["greedy", "sampled"]


@pytest.fixture(autouse=True)
def device_masked_attention(monkeypatch):
    monkeypatch.setattr(ops, "attention", attention_masked_on_device)


class TracedStep(EagerStep):
    """Stands in for `graphs.StepGraph`: record the step once, then replay the record, writing
    into static output buffers as a CUDA graph does (so a result read after the next replay
    would be wrong)."""

    def __init__(self, step, bonus, caches):
        super().__init__(step, bonus.device)
        self.bonus = bonus.clone()
        saved = [c.snapshot() for c in caches]
        self.trace = make_fx(step)(self.bonus)  # recording runs the step once: undo its commits
        for cache, snap in zip(caches, saved):
            cache.restore(snap)
        self.packed, self.next_bonus = (t.clone() for t in self.trace(self.bonus))
        for cache, snap in zip(caches, saved):
            cache.restore(snap)
        self.replays = 0

    def run(self, bonus):
        self.bonus.copy_(bonus)
        packed, next_bonus = self.trace(self.bonus)
        self.packed.copy_(packed)
        self.next_bonus.copy_(next_bonus)
        self.replays += 1
        return self.packed, self.next_bonus


def _tokens(engine: Engine, prompt: list[int], sampling: SamplingParams, n: int = 48) -> list[int]:
    return [t for s in engine.generate(Request(prompt, n, sampling=sampling)) for t in s.tokens]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_the_device_step_never_reads_back_to_the_host(stories_model, sampling):
    m = stories_model
    engine = Engine(m.target, m.drafter)
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    steps = engine.generate(Request(prompt, 64, sampling=sampling))
    next(steps)  # prefill (may sync: it runs once, eagerly)
    bonus = torch.tensor([int(engine._cached_ids[-1])])
    with torch.inference_mode(), HostReads() as reads:
        packed, _ = engine._device_step(sampling.mode)(bonus)
        engine._device_step(sampling.mode, 1)(bonus)  # b = 1 defers the drafter's context…
        engine._catch_up(bonus)  # …and the catch-up writes it
    assert reads.seen == []
    assert packed.shape == (1 + 2 * engine.block_size,)
    for read_back in (lambda t: t.tolist(), lambda t: int(t[0]), lambda t: bool(t[0] > 0), lambda t: t[t > 0]):
        with HostReads() as reads:  # the detector sees each way of reading back
            read_back(packed)
        assert reads.seen


@pytest.mark.parametrize("lookahead", [False, True], ids=["read-then-launch", "lookahead"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_replaying_one_recorded_step_gives_the_eager_tokens(stories_model, monkeypatch, sampling, lookahead):
    """With lookahead, iteration i+1 is replayed into the static outputs before iteration i is
    read: the double-buffered readback must keep iteration i's result."""
    m = stories_model
    prompts = [m.tokenizer.encode(p) for p in STORY_PROMPTS[:2]]
    eager = Engine(m.target, m.drafter)
    want = [_tokens(eager, p, sampling) for p in prompts]

    traced: list[TracedStep] = []

    def record(self, step, bonus):  # StepGraphs._runner with make_fx in place of a CUDA capture
        traced.append(TracedStep(step, bonus, self.caches))
        return traced[-1]

    monkeypatch.setattr(engine_module.StepGraphs, "_runner", record)
    engine = Engine(m.target, m.drafter, lookahead=lookahead)
    engine.graphs.enabled = True  # as on CUDA: warm_up records the step with a throwaway generation
    assert engine.warm_up(sampling) is not None and len(traced) == 1
    got = [_tokens(engine, p, sampling) for p in prompts]  # both prompts replay the warm-up's record
    assert got == want
    assert len(traced) == 1 and traced[0].replays >= 2 * 48 // m.drafter.cfg.block_size


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
