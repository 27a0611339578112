"""Engine mechanics that must not change the output: chunked prefill, cache reuse across turns."""
from __future__ import annotations

from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import STORY_PROMPTS


def _text(engine, prompt, n=40):
    return [t for s in engine.generate(Request(prompt, n)) for t in s.tokens]


def test_chunked_prefill_changes_nothing(stories_model):
    m = stories_model
    prompt = m.tokenizer.encode(" ".join(STORY_PROMPTS))
    whole = _text(Engine(m.target, m.drafter), prompt)
    assert _text(Engine(m.target, m.drafter, prefill_chunk=5), prompt) == whole


def test_next_turn_reuses_the_cached_prefix_and_changes_nothing(stories_model, monkeypatch):
    m = stories_model
    engine = Engine(m.target, m.drafter)
    first = m.tokenizer.encode(STORY_PROMPTS[0])
    answer = _text(engine, first)
    follow_up = first + answer + m.tokenizer.encode(" Then", add_special_tokens=False)
    cached = engine._cached_ids
    common = next((i for i, (a, b) in enumerate(zip(cached, follow_up)) if a != b), min(len(cached), len(follow_up)))
    assert common >= len(first) + len(answer) - 1  # the whole first turn is in the caches
    assert engine.cached_ids == tuple(cached) and engine.reusable_prefix(follow_up) == common  # the public seams
    prefilled = []
    forward = m.target.forward
    monkeypatch.setattr(m.target, "forward", lambda ids, *a, **k: prefilled.append(len(ids)) or forward(ids, *a, **k))
    reused = _text(engine, follow_up)
    monkeypatch.undo()
    assert prefilled[0] == len(follow_up) - common  # only the new text is prefilled
    assert reused == _text(Engine(m.target, m.drafter), follow_up)
    # A different conversation after that still starts from scratch correctly.
    other = m.tokenizer.encode(STORY_PROMPTS[3])
    assert _text(engine, other) == _text(Engine(m.target, m.drafter), other)


def test_context_limit_ends_generation_with_length(stories_model):
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    engine = Engine(m.target, m.drafter, max_context=len(prompt) + 10)
    steps = list(engine.generate(Request(prompt, 100)))
    assert sum(len(s.tokens) for s in steps) == 10 and steps[-1].finish == "length"


def test_cuda_graphs_are_off_on_cpu_and_one_runner_serves_each_sampling_mode(stories_model):
    """Sampling values are device data: a new temperature, top-p value or seed reuses the runner (on a
    GPU: the captured graph and its memory); only turning a filter on or off needs another."""
    m = stories_model
    engine = Engine(m.target, m.drafter)
    assert not engine.graphs.enabled
    prompt = m.tokenizer.encode("Once upon a time")
    for sampling in (SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1.3, seed=2),
                     SamplingParams(temperature=0.9, top_p=0.9, seed=3), SamplingParams(temperature=0.5, top_p=0.5),
                     SamplingParams(), SamplingParams(temperature=0.0, top_k=5)):
        list(engine.generate(Request(prompt, 8, sampling=sampling)))
    assert len(engine.graphs._runners) == 3  # sampling, sampling with top-p, greedy


def test_cuda_graphs_need_the_kernel_path(monkeypatch):
    import torch

    from dflash_cli.graphs import graphs_enabled

    cuda = torch.device("cuda")  # only the decision is tested: no GPU needed
    monkeypatch.delenv("DFLASH_KERNELS", raising=False)
    monkeypatch.delenv("DFLASH_CUDA_GRAPHS", raising=False)
    assert graphs_enabled(cuda) and not graphs_enabled(torch.device("cpu"))
    monkeypatch.setenv("DFLASH_KERNELS", "torch")  # the references read lengths back to the host
    assert not graphs_enabled(cuda)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert graphs_enabled(cuda)
    monkeypatch.setenv("DFLASH_CUDA_GRAPHS", "0")
    assert not graphs_enabled(cuda)


def test_lookahead_changes_no_output_and_leaves_the_caches_right(stories_model):
    """Iteration i+1 queued before iteration i is read (the CUDA default), forced on here: same
    tokens at a stop token, at the token budget, at the context limit (where the queued block
    runs furthest past the limit), after a generation closed midway, and on the next turn."""
    m = stories_model
    stop = frozenset({m.tokenizer.encode(" the", add_special_tokens=False)[0]})

    def run(lookahead: bool) -> list:
        prompt = m.tokenizer.encode(STORY_PROMPTS[0])
        engine = Engine(m.target, m.drafter, lookahead=lookahead)
        out = [_text(engine, prompt, 37)]
        out.append([t for s in engine.generate(Request(prompt, 60, stop)) for t in s.tokens])
        steps = engine.generate(Request(m.tokenizer.encode(STORY_PROMPTS[1]), 100))
        out.append([t for _, s in zip(range(3), steps) for t in s.tokens])
        steps.close()  # stopped midway, as Ctrl-C does
        follow_up = prompt + out[0] + m.tokenizer.encode(" Then", add_special_tokens=False)
        out.append(_text(engine, follow_up))  # reuses the cached prefix
        return out

    plain = run(False)
    assert run(True) == plain
    assert len(plain[0]) == 37


def test_lookahead_at_the_context_limit_stays_inside_the_caches(stories_model):
    """The queued iteration after the last one writes its block furthest past the limit: up to
    2 blocks (`cache_slack`). On the CPU a write past the caches or the rope table raises."""
    from dflash_cli.engine import cache_slack

    m = stories_model
    prompt = m.tokenizer.encode("Tom had a big")
    furthest = 0
    for extra in range(5, 14):
        limited = [Engine(m.target, m.drafter, max_context=len(prompt) + extra, lookahead=on) for on in (False, True)]
        assert _text(limited[1], prompt, 100) == _text(limited[0], prompt, 100)
        furthest = max(furthest, int(limited[1].target_cache.length) - limited[1].max_context)
    block = m.drafter.cfg.block_size
    assert block < furthest <= cache_slack(block)  # the queued block did run more than one block past


def test_a_prefill_chunk_reads_the_cache_length_back_once(stories_model):
    """Not once per layer: each read waits for the GPU to drain what was queued before it."""
    import torch

    from .host_reads import HostReads

    m = stories_model
    cache = m.target.new_cache(128)
    ids = torch.arange(3, 43)  # 40 tokens: a prefill chunk, past the kernels' decode/verify sizes
    with torch.inference_mode(), HostReads() as reads:
        m.target.forward(ids, cache, logits_from=-1)
    assert len(m.target.layers) > 1 and len(reads.seen) == 1, reads.seen


def test_a_small_model_on_the_cpu_runs_on_one_thread_unless_omp_says_otherwise(stories_pair, monkeypatch):
    """Threads only slow a model of a few hundred tiny ops down (loader.cpu_threads); a big model, or
    OMP_NUM_THREADS set by the user, keeps torch's choice."""
    import torch

    from dflash_cli import loader

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    loader.load(*stories_pair, device="cpu")
    assert calls == [1]
    loader.cpu_threads(loader.SMALL_MODEL_BYTES + 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    loader.load(*stories_pair, device="cpu")
    assert calls == [1]
