"""Adaptive block size: the policy alone, fed synthetic costs and acceptance; and the engine switching
block size at every iteration without changing a token."""
from __future__ import annotations

import itertools

import pytest
import torch

from dflash_cli import adaptive, loader
from dflash_cli.adaptive import Acceptance, Adaptive, Decision, candidates, choose, position_rates
from dflash_cli.drafter import DEFERRED
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS, STORY_PROMPTS, random_prompts

# Iteration costs shaped like a small model on a CPU: drafting at all is expensive, a longer block barely more.
CPU_LIKE = {1: 1.0, 2: 1.4, 4: 1.5, 8: 1.7}
GPU_LIKE = {1: 1.0, 2: 1.01, 4: 1.02, 8: 1.05, 16: 1.15}


def acceptance_with(rates: list[float], weight: float = 1e6) -> Acceptance:
    """Estimates pinned at `rates` (as if after a great many observations)."""
    a = Acceptance(len(rates))
    a.seen = [weight] * len(rates)
    a.hits = [r * weight for r in rates]
    return a


def brute_force_best(costs: dict[int, float], rates: list[float]) -> int:
    """The block size with the most tokens per second, from the definition: an iteration at b commits
    1 + (number of leading accepted drafts), draft i accepted with probability rates[i-1] given the rest."""
    def expected(b: int) -> float:
        return 1 + sum(torch.tensor(rates[:i]).prod().item() for i in range(1, b))
    return max(sorted(costs), key=lambda b: expected(b) / costs[b])


# ---- the policy ---------------------------------------------------------------------------------------------
def test_candidates_are_one_the_powers_of_two_and_the_largest():
    assert candidates(16) == [1, 2, 4, 8, 16]
    assert candidates(10) == [1, 2, 4, 8, 10]
    assert candidates(8) == [1, 2, 4, 8] and candidates(1) == [1]


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE], ids=["cpu-like", "gpu-like"])
@pytest.mark.parametrize("rates", [
    [0.0] * 15, [0.1] * 15, [0.3] * 15, [0.5] * 15, [0.7] * 15, [0.95] * 15,
    [0.9, 0.9, 0.9, 0.2] + [0.9] * 11,  # a cliff at position 4
    [0.35] + [1.0] * 14,  # all or nothing: the first draft decides
    [0.9 ** i for i in range(1, 16)],  # falling with depth
], ids=lambda r: "-".join(f"{x:.2f}" for x in r[:4]))
def test_the_policy_picks_the_most_tokens_per_second(costs, rates):
    largest = max(costs)
    rates = rates[:largest - 1]
    decision = choose(costs, acceptance_with(rates))
    assert decision.block_size == brute_force_best(costs, rates)


def test_expected_tokens_is_one_plus_the_chance_of_each_prefix():
    a = acceptance_with([0.5, 0.4, 0.9])
    assert a.expected_tokens(1) == 1.0
    assert a.expected_tokens(4) == pytest.approx(1 + 0.5 + 0.5 * 0.4 + 0.5 * 0.4 * 0.9, rel=1e-5)


def test_an_iteration_teaches_only_the_positions_it_reached():
    a = Acceptance(7)
    start = list(a.seen)
    a.observe(drafted=7, accepted=2)  # drafts 1, 2 accepted, 3 rejected, 4..7 never judged
    rates = a.rates()
    assert rates[0] == rates[1] > adaptive.PRIOR > rates[2]
    assert a.seen[3:] == start[3:] and rates[3:] == [pytest.approx(adaptive.PRIOR)] * 4
    before = list(a.seen)
    a.observe(drafted=3, accepted=3)  # positions 4..7 not drafted: they keep what they saw
    assert a.seen[3:] == before[3:] and a.seen[:3] != before[:3]


def test_paused_and_drafting_decisions_say_why():
    paused = choose(CPU_LIKE, acceptance_with([0.1] * 7))
    assert paused.block_size == 1 and paused.paused and paused.rival in (2, 4, 8)
    assert paused.rival_break_even == CPU_LIKE[paused.rival]
    text = paused.describe()
    assert text.startswith("b 1 · drafting paused: τ ") and f"< break-even {CPU_LIKE[paused.rival]:.1f}" in text
    drafting = choose(GPU_LIKE, acceptance_with([0.95] * 15))
    assert drafting.describe() == f"b 16 · τ {drafting.expected_tau:.1f}" and drafting.expected_tau > 6
    assert Decision(16, 6.14, 1.2).describe() == "b 16 · τ 6.1"
    assert Decision(1, 1.0, 1.0, 8, 1.23, 1.5).describe() == "b 1 · drafting paused: τ 1.2 < break-even 1.5"
    assert Decision(8, 1.43, 1.7, probe=True).describe() == "b 8 · probe: τ 1.4 < break-even 1.7"


def run_policy(costs: dict[int, float], accepted, iterations: int, policy: Adaptive | None = None) -> list[int]:
    """The block sizes a policy picks when an iteration at b gets accepted(i, b) drafts."""
    policy = policy or Adaptive(max(costs))
    chosen = []
    for i in range(iterations):
        b = policy.decide(costs).block_size
        policy.observe(b, accepted(i, b))
        chosen.append(b)
    return chosen


def test_a_useless_drafter_is_paused_and_probed_rarely():
    chosen = run_policy(CPU_LIKE, lambda i, b: 0, 2000)
    probes = sum(b > 1 for b in chosen[100:])
    assert chosen[-1] == 1 and chosen[100:].count(1) > 0.9 * len(chosen[100:])
    assert probes >= 10  # it still probes (what probes may cost: the next test)


def modelled_seconds(costs: dict[int, float], chosen: list[int]) -> float:
    return sum(costs[b] for b in chosen)


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE], ids=["cpu-like", "gpu-like"])
def test_probes_cost_at_most_their_share_of_the_paused_time(costs):
    """Against a drafter that never gets a draft right, everything drafting costs above b = 1 is lost:
    after the first blocks, that loss stays within PROBE_SHARE of the time (plus one probe). Where a
    block costs barely more than a plain step (gpu-like), the prior alone may keep b = 2 worth it."""
    after = run_policy(costs, lambda i, b: 0, 3000)[50:]
    lost = sum(costs[b] - costs[1] for b in after)
    assert 0 < lost <= adaptive.PROBE_SHARE * modelled_seconds(costs, after) + max(costs.values())


def test_probes_come_sooner_near_the_break_even():
    """A probe that is expected to lose little runs soon; one expected to lose a lot waits longer."""
    def first_probe(rate: float) -> int:
        policy = Adaptive(8)
        policy.acceptance = acceptance_with([rate] * 7, weight=20.0)
        return next(i for i, b in enumerate(run_policy(CPU_LIKE, lambda i, b: 0, 200, policy)) if b > 1)
    near, far = first_probe(0.25), first_probe(0.02)  # b = 2 breaks even at τ 1.4 (p_1 = 0.4)
    assert 0 < near < far


def test_a_drafter_that_misses_its_first_blocks_resumes_soon():
    """The first blocks of an answer are drafted from the prompt alone and may all miss; the pause
    that causes ends at an early probe, not dozens of iterations later. Costs of this machine's demo
    pair, where any drafting costs over 2× a plain step."""
    tiny = {1: 1.0, 2: 2.0, 4: 2.1, 8: 2.2}
    chosen = run_policy(tiny, lambda i, b: 0 if i < 3 else b - 1, 60)
    assert chosen[:3] == [8, 8, 8] and chosen[3] == 1  # it drafted, missed three times, and paused
    assert set(chosen[16:]) == {8}


def test_a_good_drafter_keeps_the_largest_block():
    assert set(run_policy(CPU_LIKE, lambda i, b: b - 1, 500)[5:]) == {8}
    assert set(run_policy(GPU_LIKE, lambda i, b: b - 1, 500)[5:]) == {16}


def test_drafting_resumes_when_the_drafter_becomes_good_again():
    """Prose (nothing accepted) then code (every draft accepted): the pause ends at a probe."""
    policy = Adaptive(8)
    run_policy(CPU_LIKE, lambda i, b: 0, 300, policy)
    assert policy.decide(CPU_LIKE).block_size == 1
    after = run_policy(CPU_LIKE, lambda i, b: b - 1, 300, policy)
    resumed = after.index(8)
    assert resumed < 100 and set(after[resumed:]) == {8}


def test_measured_position_rates():
    # b=8 with 2 accepted, b=8 with 7, b=4 with 0, b=1 (nothing drafted)
    rates = position_rates([8, 8, 4, 1], [3, 8, 1, 1], 7)
    assert rates == [2 / 3, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert position_rates([1, 1], [1, 1], 3) == [None, None, None]


# ---- the engine: switching block size is lossless ---------------------------------------------------------
class Scripted:
    """A policy that cycles through given block sizes (no costs, nothing learnt)."""

    adaptive = False

    def __init__(self, sizes: list[int]):
        self.sizes = sorted(set(sizes))
        self._next = itertools.cycle(sizes)
        self.acceptance = Acceptance(max(sizes) - 1)

    def reset(self) -> None:
        pass

    def decide(self, costs) -> Decision:
        return Decision(next(self._next), 1.0, 1.0)

    def observe(self, block_size: int, accepted: int) -> None:
        pass


SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7)]


def _steps(engine: Engine, prompt: list[int], n: int, sampling: SamplingParams, check_caches: bool = False) -> list:
    steps = []
    for step in engine.generate(Request(prompt, n, sampling=sampling)):
        steps.append(step)
        if check_caches and step.finish is None:  # both caches hold exactly the committed tokens
            committed = len(prompt) + sum(len(s.tokens) for s in steps) - 1
            drafter_holds = int(engine.draft_cache.length) + int(engine.draft_cache.pending_count)  # some deferred
            assert int(engine.target_cache.length) == drafter_holds == committed
    return steps


def _tokens(steps) -> list[int]:
    return [t for s in steps for t in s.tokens]


@pytest.mark.parametrize("pair_name, script", [
    ("stories_pair", [8, 1, 1, 4, 8, 2, 1, 3, 8, 8, 1, 5]),
    ("qwen3_pair", [16, 1, 1, 4, 16, 2, 1, 7]),
    ("llama_pair", [16, 1, 1, 4, 16, 2, 1, 7]),
    ("qwen35_pair", [8, 1, 1, 4, 8, 2, 1, 3]),  # the hybrid: recurrent states replayed per b
    ("qwen3_moe_pair", [8, 1, 2, 8, 4, 1, 1, 8]),  # the expert kernel at every b
    ("qwen35_moe_pair", [8, 1, 1, 4, 8, 2, 1, 3]),  # hybrid and experts
    ("gpt_oss_pair", [8, 1, 4, 8, 1, 2, 8, 1]),  # sinks and a window of 8 across b
])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
@pytest.mark.slow
def test_forced_switching_writes_the_plain_tokens(pair_name, script, sampling, request):
    target_dir, drafter_dir = request.getfixturevalue(pair_name)
    m = loader.load(target_dir, drafter_dir, device="cpu")
    if pair_name == "stories_pair":
        prompts = [m.tokenizer.encode(STORY_PROMPTS[0]), m.tokenizer.encode("What is 12 times 7?")]
    elif pair_name in ("qwen35_pair", "qwen3_moe_pair", "qwen35_moe_pair", "gpt_oss_pair"):
        prompts = HYBRID_PROMPTS[:2]
    else:
        prompts = random_prompts(2, m.target.cfg.vocab_size, seed=3)
    accepted = []
    for prompt in prompts:
        want = _tokens(_steps(Engine(m.target), prompt, 40, sampling))
        for lookahead in (False, True):
            engine = Engine(m.target, m.drafter, lookahead=lookahead)
            engine.policy = Scripted(script)
            steps = _steps(engine, prompt, 40, sampling, check_caches=not lookahead)
            assert _tokens(steps) == want, f"lookahead {lookahead}, prompt {prompt}"
            used = [s.block_size for s in steps if not s.prefill]
            assert used[:len(script)] == script[:len(used)]  # the script really ran
            accepted += [s.accepted for s in steps if not s.prefill]
    if pair_name in ("stories_pair", "qwen35_pair", "qwen35_moe_pair") and sampling.greedy:  # fitted: drafts really were accepted
        assert max(accepted) >= 2


def test_at_b1_the_drafter_context_waits_and_catches_up_before_the_next_draft(stories_model):
    """Plain iterations defer the drafter's context (they cost what plain decoding costs); the next draft
    first catches up in one batch, after which the drafter's context cache holds what a fresh prefill of
    the same tokens gives, and it drafts what a fresh engine drafts."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[0])
    engine = Engine(m.target, m.drafter)
    engine.policy = Scripted([1] * 6 + [8])
    steps = engine.generate(Request(prompt, 60))
    emitted = [t for _, s in zip(range(7), steps) for t in s.tokens]  # prefill and six b = 1 iterations
    committed = prompt + emitted[:-1]
    n = len(committed)
    assert int(engine.draft_cache.pending_count) == 6 and int(engine.draft_cache.length) == n - 6
    resumed = next(steps)
    assert resumed.block_size == 8 and int(engine.draft_cache.pending_count) == 0
    fresh = Engine(m.target, m.drafter)
    with torch.inference_mode():
        fresh._prefill(committed)
    torch.testing.assert_close(engine.draft_cache.k[:, :, :n], fresh.draft_cache.k[:, :, :n])
    torch.testing.assert_close(engine.draft_cache.v[:, :, :n], fresh.draft_cache.v[:, :, :n])
    first = next(s for s in Engine(m.target, m.drafter).generate(Request(committed, 60)) if not s.prefill)
    assert resumed.drafts == first.drafts
    steps.close()


def test_a_generation_that_ends_in_plain_iterations_leaves_the_drafter_caught_up(stories_model):
    """The next turn reuses the drafter's context: a generation that ends (or is stopped) while tokens
    are deferred writes them before it returns; and more than DEFERRED plain iterations in a row catch
    up on the way."""
    from dflash_cli.drafter import DEFERRED

    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[1])
    engine = Engine(m.target, m.drafter)
    engine.policy = Scripted([1])
    steps = list(engine.generate(Request(prompt, DEFERRED + 10)))
    n = len(prompt) + sum(len(s.tokens) for s in steps) - 1
    assert int(engine.draft_cache.pending_count) == 0 and int(engine.draft_cache.length) == int(engine.target_cache.length) == n
    fresh = Engine(m.target, m.drafter)
    with torch.inference_mode():
        fresh._prefill(prompt + [t for s in steps for t in s.tokens][:-1])
    torch.testing.assert_close(engine.draft_cache.k[:, :, :n], fresh.draft_cache.k[:, :, :n])
    stopped = engine.generate(Request(prompt + [5], 40))
    next(stopped), next(stopped), next(stopped)
    stopped.close()  # Ctrl-C between iterations
    assert int(engine.draft_cache.pending_count) == 0


def test_each_block_size_is_its_own_step_and_sampling_modes_stay_apart(stories_model):
    m = stories_model
    engine = Engine(m.target, m.drafter)
    engine.policy = Scripted([8, 1, 4])
    prompt = m.tokenizer.encode(STORY_PROMPTS[1])
    for sampling in SAMPLINGS:
        list(engine.generate(Request(prompt, 30, sampling=sampling)))
    assert sorted((mode.greedy, b) for mode, b in filter(lambda key: key != "catch-up", engine.graphs._runners)) == [
        (False, 1), (False, 4), (False, 8), (True, 1), (True, 4), (True, 8)]


# ---- the engine: choosing ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_drafter(stories_model, tmp_path_factory):
    """A drafter of the demo drafter's layout, never trained: τ about 1 on anything."""
    import json

    from .tiny import drafter_config, write_drafter

    cfg = json.loads((stories_model.target_dir / "config.json").read_text())
    shape = stories_model.drafter.cfg
    return write_drafter(tmp_path_factory.mktemp("untrained") / "drafter", drafter_config(
        cfg, block_size=8, layers=1, target_layer_ids=shape.target_layer_ids, mask_token_id=shape.mask_token_id))


def test_auto_drafts_where_tau_is_high_and_stops_where_it_is_not(stories_model, untrained_drafter):
    """Costs given (not measured), shaped like this CPU's. With the trained drafter a fixed block gets
    a high τ on story openings and auto keeps drafting; with an untrained drafter of the same shape
    (τ about 1 on the same prompts) auto falls to b = 1. Every answer is the plain one."""
    m = stories_model
    useless = loader.load(m.target_dir, untrained_drafter, device="cpu")
    prompts = [m.tokenizer.encode(p) for p in STORY_PROMPTS]
    taus = {}
    for name, drafter in (("trained", m.drafter), ("untrained", useless.drafter)):
        auto = Engine(m.target, drafter, adaptive=True)
        auto.costs.put(SamplingParams().mode, 0, CPU_LIKE)
        for prompt in prompts:
            fixed = [s for s in _steps(Engine(m.target, drafter), prompt, 48, SamplingParams()) if not s.prefill]
            tau = sum(s.acceptance_length for s in fixed) / len(fixed)
            steps = _steps(auto, prompt, 48, SamplingParams())
            assert _tokens(steps) == _tokens(_steps(Engine(m.target), prompt, 48, SamplingParams()))
            sizes = [s.block_size for s in steps if not s.prefill]
            taus.setdefault(name, []).append((tau, sum(b > 1 for b in sizes) / len(sizes)))
    high = [drafting for tau, drafting in taus["trained"] if tau >= 3]
    low = [1 - drafting for tau, drafting in taus["untrained"] if tau < 1.3]
    assert len(high) >= 3 and len(low) >= 6, taus  # both kinds are really there
    assert min(high) >= 0.9 and min(low) >= 0.6, taus


def test_costs_are_measured_once_per_context_bucket_and_change_no_token(stories_model, monkeypatch):
    """A long generation crosses context buckets; each is measured once, mid-generation (with a
    queued iteration under lookahead), and the measurement's real iterations are undone."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[2])
    want = _tokens(_steps(Engine(m.target), prompt, 90, SamplingParams(temperature=0.9, seed=3)))
    for lookahead in (False, True):
        engine = Engine(m.target, m.drafter, adaptive=True, lookahead=lookahead)
        engine.costs.first_bucket = 16
        measured = []
        real = engine.measure

        def measure(mode, bonus):
            measured.append(len(engine._cached_ids))
            return real(mode, bonus)

        monkeypatch.setattr(engine, "measure", measure)
        steps = _steps(engine, prompt, 90, SamplingParams(temperature=0.9, seed=3))
        assert _tokens(steps) == want
        buckets = [adaptive.bucket(n, 16) for n in measured]
        assert buckets == [16, 32, 64, 128]  # the prompt's bucket, then each doubling, once
        assert set(engine.costs.table[(SamplingParams(temperature=0.9).mode, 64)]) == {1, 2, 4, 8}


class PausedAndMeasuring(Scripted):
    """b = 1 every iteration, with a cost measurement due at every decision: the worst case for the
    drafter's deferred context (a measurement when its buffer is full)."""

    adaptive = True

    def __init__(self, block_size: int):
        super().__init__([1])
        self.sizes = candidates(block_size)


@pytest.mark.slow
def test_a_measurement_with_a_full_deferred_buffer_stays_inside_it(stories_model, monkeypatch):
    """gpu-review-2 F6: with DEFERRED tokens deferred, the measurement's timed b = 1 run deferred one
    more into a buffer with no room (an IndexError here; on a GPU, a device assert that kills the
    context, and every later request of a server fails). The drafter catches up before measuring."""
    m = stories_model
    prompt = m.tokenizer.encode(STORY_PROMPTS[3])
    want = _tokens(_steps(Engine(m.target), prompt, 80, SamplingParams()))
    for lookahead in (False, True):
        engine = Engine(m.target, m.drafter, adaptive=True, lookahead=lookahead)
        engine.policy = PausedAndMeasuring(engine.block_size)
        monkeypatch.setattr(engine.costs, "get", lambda mode, context: None)  # measure at every decision
        steps = _steps(engine, prompt, 80, SamplingParams(), check_caches=not lookahead)
        assert _tokens(steps) == want and len(steps) > DEFERRED + 2  # past a full buffer
        assert int(engine.draft_cache.pending_count) == 0  # the generation ended caught up


def test_measuring_restores_a_recurrent_state(qwen35_pair):
    """The hybrid's measured iterations really advance its recurrent state: the snapshot taken before
    them is put back, so measuring mid-generation (each context bucket) changes no token."""
    m = loader.load(*qwen35_pair, device="cpu")
    prompt = HYBRID_PROMPTS[0]
    want = _tokens(_steps(Engine(m.target), prompt, 40, SamplingParams()))
    for lookahead in (False, True):
        engine = Engine(m.target, m.drafter, adaptive=True, lookahead=lookahead)
        engine.costs.first_bucket = 8
        assert _tokens(_steps(engine, prompt, 40, SamplingParams())) == want
        assert len(engine.costs.table) >= 3  # measured at the prompt, then at each doubling


def test_measuring_at_the_context_limit_stays_inside_the_caches(stories_model):
    """Each measured iteration's commit is undone before the next (on a CPU a write past the caches
    raises): ten rounds at every block size would otherwise run far past a context near its limit."""
    m = stories_model
    prompt = m.tokenizer.encode(" ".join(STORY_PROMPTS))
    engine = Engine(m.target, m.drafter, adaptive=True, max_context=len(prompt) + 6)
    steps = _steps(engine, prompt, 100, SamplingParams())
    assert _tokens(steps) == _tokens(_steps(Engine(m.target), prompt, 6, SamplingParams()))
    assert steps[-1].finish == "length" and engine.costs.table


def test_the_draft_window_bounds_the_drafters_attention_and_changes_no_token(stories_model, monkeypatch):
    from dflash_cli import ops

    m = stories_model
    windows = []
    attention = ops.attention
    monkeypatch.setattr(ops, "attention",
                        lambda *a, sliding_window=None, **k: windows.append(sliding_window) or attention(
                            *a, sliding_window=sliding_window, **k))
    prompt = m.tokenizer.encode(" ".join(STORY_PROMPTS))
    want = _tokens(_steps(Engine(m.target), prompt, 40, SamplingParams()))
    windows.clear()
    narrow = Engine(m.target, m.drafter, draft_window=4)
    assert _tokens(_steps(narrow, prompt, 40, SamplingParams())) == want
    assert 4 in windows and set(windows) <= {4, None}  # the drafter's layers at 4; the target's unbounded
    assert "draft window 4" in narrow.describe()
    with pytest.raises(Exception, match="draft window must be at least 1"):
        Engine(m.target, m.drafter, draft_window=0)


def test_run_json_shows_auto_drafting_where_it_pays_and_plain_decoding_where_it_does_not(capsys, stories_pair,
                                                                                          untrained_drafter, tmp_path):
    """`dflash run --json` (auto is the default, its costs measured on this machine): `block_sizes` stay
    above 1 where the trained drafter gets the story right, and fall to 1 with a drafter that gets
    nothing right, on the same prompts; every answer is the plain one."""
    import json

    from dflash_cli.cli import main

    t, d = stories_pair
    batch = tmp_path / "prompts.jsonl"
    strong = ["Once upon a time", "Tom had a big"]  # the trained drafter is right from their first block
    batch.write_text("".join(json.dumps(p) + "\n" for p in strong))
    base = ["run", "--target", str(t), "--device", "cpu", "--raw", "--prompt-file", str(batch), "--json", "-n", "64", "-q"]
    runs = {}
    for name, args in (("plain", ["--no-spec"]), ("trained", ["--drafter", str(d)]),
                       ("untrained", ["--drafter", str(untrained_drafter)])):
        assert main(base + args) == 0
        runs[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["token_ids"] for r in runs[name]] == [r["token_ids"] for r in runs["plain"]], name
    for r in runs["trained"] + runs["untrained"]:
        assert r["adaptive"] and r["block_size"] == 8 and len(r["block_sizes"]) == len(r["acceptance_lengths"])
        assert len(r["position_acceptance"]) == max(r["block_sizes"]) - 1
    drafting = [sum(b > 1 for b in r["block_sizes"]) / len(r["block_sizes"]) for r in runs["trained"]]
    plain_share = [sum(b == 1 for b in r["block_sizes"]) / len(r["block_sizes"]) for r in runs["untrained"]]
    assert min(drafting) >= 0.9 and min(plain_share) >= 0.6, (drafting, plain_share)
    assert all(r["mean_acceptance_length"] > 3 for r in runs["trained"])


def test_the_memory_plan_counts_a_captured_step_per_candidate_block_size():
    """An adaptive engine captures one step per candidate b: at Qwen3-8B shapes with B = 16 the plan
    holds the scratch of the steps at b = 2, 4, 8 and 16 on top of what plain decoding (b = 1) needs."""
    from dflash_cli import memory
    from dflash_cli.synthetic import configs

    _, cfg, _, _ = configs("qwen3-8b")
    extra = memory.workspace_bytes(cfg, 16) - memory.workspace_bytes(cfg, 1)
    assert extra >= sum(memory._step_scratch(cfg, b) for b in (2, 4, 8, 16))
    assert memory.workspace_bytes(cfg, 16) < memory.GiB  # still small next to the weights


def test_measuring_a_slow_model_on_a_cpu_takes_fewer_rounds(monkeypatch):
    """An 8B model's iteration takes seconds on a CPU: nine rounds at five block sizes would hold the
    first answer for minutes. The rounds shrink to fit the budget (never below one); fast models keep nine."""
    import time

    calls = {1: 0, 2: 0}

    def run(b, seconds):
        def call():
            calls[b] += 1
            time.sleep(seconds)
        return call

    monkeypatch.setattr(adaptive, "CPU_BUDGET_S", 0.1)
    adaptive.time_iterations({1: run(1, 0.06), 2: run(2, 0.06)}, torch.device("cpu"))
    assert calls == {1: 2, 2: 2}  # the untimed call and one round
    calls.update({1: 0, 2: 0})
    adaptive.time_iterations({1: run(1, 0.0), 2: run(2, 0.0)}, torch.device("cpu"))
    assert calls == {1: 1 + adaptive.ROUNDS["cpu"], 2: 1 + adaptive.ROUNDS["cpu"]}


def test_the_measurement_keeps_the_fastest_round_because_noise_only_adds_time():
    """A busy stretch slows some rounds (here two in three, by 8×): the figure stays the iteration's own
    cost, which the median of the rounds would not."""
    import time

    calls = {1: 0, 2: 0}

    def run(b, seconds):
        def call():
            calls[b] += 1
            disturbed = calls[b] % 3 != 0
            end = time.perf_counter() + seconds * (8 if disturbed else 1)
            while time.perf_counter() < end:  # busy, not asleep: a sleeping thread spends no CPU time
                pass
        return call

    costs = adaptive.time_iterations({1: run(1, 0.002), 2: run(2, 0.004)}, torch.device("cpu"), rounds=9)
    assert costs[1] == pytest.approx(0.002, rel=0.5) and costs[2] == pytest.approx(0.004, rel=0.5)


# ---- --tree-budget auto: the chain or a tree, from the cost per node count and the acceptance per rank ------
CHAIN_8 = {1: 1.0, 2: 1.01, 4: 1.02, 8: 1.05}
FLAT_TREES = {4: 1.06, 8: 1.07, 16: 1.08, 32: 1.1, 64: 1.3}  # a GPU: verify nearly flat up to ~32 rows
STEEP_TREES = {4: 3.0, 8: 5.0, 16: 9.0, 32: 17.0, 64: 33.0}  # verify cost per node steep (a CPU)


def ranked_acceptance(p: float, hazard: float, positions: int = 7, weight: float = 1e6) -> Acceptance:
    """Estimates pinned at acceptance `p` for the drafter's top id and `hazard` for each lower rank (the
    chance of rank r given none of ranks 0..r-1)."""
    a = acceptance_with([p] * positions, weight)
    a.rank_hits = [[hazard * weight] * 63 for _ in range(positions)]
    a.rank_seen = [[weight] * 63 for _ in range(positions)]
    return a


def test_auto_picks_a_tree_when_its_tau_gain_outweighs_its_cost_and_the_chain_when_nodes_are_steep():
    hesitant = ranked_acceptance(0.5, 0.5)  # the target's token is often the drafter's second or third
    tree = choose(CHAIN_8, hesitant, FLAT_TREES, 8)
    chain = choose(CHAIN_8, hesitant)
    assert tree.tree_budget in FLAT_TREES and tree.block_size == 8
    assert tree.expected_tau / FLAT_TREES[tree.tree_budget] > chain.expected_tau / CHAIN_8[chain.block_size]
    assert "tree" in tree.describe()
    steep = choose(CHAIN_8, hesitant, STEEP_TREES, 8)
    assert steep.tree_budget == 0 and steep == chain
    # a drafter whose top id is always right gains nothing from a tree: the chain, even on flat costs
    assert choose(CHAIN_8, ranked_acceptance(1.0, 0.5), FLAT_TREES, 8).tree_budget == 0
    # a tree may win where no chain pays (drafting paused): it drafts again, at the largest b
    cpu = {1: 1.0, 2: 1.4, 4: 1.5, 8: 1.7}
    weak = ranked_acceptance(0.1, 0.9)
    assert choose(cpu, weak).paused and choose(cpu, weak, {4: 1.5, 8: 1.5, 16: 1.6}, 8).tree_budget > 0


def test_auto_trees_stay_on_the_attention_kernels_graph_safe_rows():
    """A verify of more than ops.MAX_KERNEL_Q_LEN rows reads its length back (no CUDA graph, not batch-
    invariant): auto's budgets stop there, and at the caches' room."""
    from dflash_cli import ops

    assert max(adaptive.tree_budgets(1 << 30)) <= ops.MAX_KERNEL_Q_LEN < 64
    assert adaptive.tree_budgets(10) == (4, 8) and adaptive.tree_budgets(0) == ()


def test_a_pinned_block_size_with_auto_trees_chooses_between_the_chain_and_trees_at_that_size():
    policy = adaptive.Pinned(8, (4, 8, 16))
    policy.acceptance = ranked_acceptance(0.5, 0.5)
    assert policy.decide({8: 1.05}, FLAT_TREES).tree_budget > 0
    assert policy.decide({8: 1.05}, STEEP_TREES).tree_budget == 0 and policy.decide({8: 1.05}).block_size == 8


def test_tree_tokens_is_the_chain_with_one_rank_and_the_best_prefixes_with_more():
    """One rank per position: the chain's τ. More: 1 + the summed chance of the n - 1 likeliest prefixes
    (by brute force), when chances fall with rank as the drafter's sort makes them."""
    rates = [0.9, 0.7, 0.6, 0.4]
    assert adaptive.tree_tokens([[r] for r in rates], 5) == pytest.approx(acceptance_with(rates).expected_tokens(5))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        q = torch.rand(3, 3, generator=gen).sort(descending=True).values
        q = (q / q.sum(1, keepdim=True) * 0.9).tolist()  # each position's ranks: at most 0.9 in all
        prefixes = []
        for depth in range(1, 4):
            for ranks in itertools.product(range(3), repeat=depth):
                prefixes.append(float(torch.tensor([q[d][r] for d, r in enumerate(ranks)]).prod()))
        prefixes.sort(reverse=True)
        for n in (2, 4, 8, 16):
            assert adaptive.tree_tokens(q, n) == pytest.approx(1 + sum(prefixes[:n - 1]))


def test_a_walk_teaches_the_rank_it_hit_and_the_ranks_it_missed_and_nothing_past_its_stop():
    a = Acceptance(7)
    before = (list(a.seen), [list(s) for s in a.rank_seen])
    for _ in range(60):  # the target's token: rank 1 at depth 1, rank 0 at 2 and 3, none of 2 children at 4
        a.observe_walk(7, adaptive.Walk(ranks=(1, 0, 0), stop_children=2))
    q = a.rank_probabilities(7, 3)
    assert q[0][1] > 0.9 and q[0][0] < 0.1  # depth 1: rank 1, not rank 0
    assert q[1][0] > 0.9 and q[2][0] > 0.9
    assert q[3][0] < 0.1 and q[3][1] < 0.1 / (1 - q[3][0])  # depth 4: neither rank 0 nor 1
    assert a.seen[4:] == before[0][4:] and a.rank_seen[4:] == before[1][4:]  # never judged: unchanged
    second = a.seen[1]
    a.observe_walk(7, adaptive.Walk(ranks=(0,), stop_children=0))  # stopped where the tree had no child
    assert a.seen[1] == second  # so depth 2 was not judged
    chain = Adaptive(8, (4, 8))
    chain.observe(8, 3)  # a chain iteration learns rank 0 only, as before
    assert chain.acceptance.rank_seen == [[] for _ in range(7)]
