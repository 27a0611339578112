"""What the adaptive block-size benchmarks share (adaptive.py, adaptive_costs.py, adaptive_floor.py,
adaptive_replay.py, adaptive_frontier.py; scripts, not tests): the prompts, the demo pair or its drafter
with random weights, engines held at one block size, a timed answer, and a policy replayed on recorded
acceptance at measured costs. Everything here goes through the engine's, the drafter's and the
policy's public seams: no benchmark reaches into an engine's private attributes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dflash_cli import drafter as drafter_module, engine as engine_module, loader, registry  # noqa: E402
from dflash_cli.adaptive import Policy, Pinned, candidates, time_iterations  # noqa: E402
from dflash_cli.config import DrafterConfig  # noqa: E402
from dflash_cli.drafter import weight_table  # noqa: E402
from dflash_cli.engine import Engine, Request, catch_up_due  # noqa: E402
from dflash_cli.models.weights import random_weights  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402
from dflash_cli.sampling import SamplingParams  # noqa: E402

# (label, prompt, tokens): the bench's held-out story openings (no training prompt begins with them),
# the commonest opening of all (long: the story drifts from what the drafter predicts), and text that is
# not a story (the target answers with one anyway).
PROMPTS = [
    ("held out", "The old owl sat in the tall tree", 64),
    ("held out", "Max found a shiny blue stone", 64),
    ("held out", "Anna wanted to bake a cake for her mom", 64),
    ("held out", "A tiny frog lived by the pond", 64),
    ("held out", "Every morning, the baker", 64),
    ("common, long", "Once upon a time", 200),
    ("not a story", "What is 12 times 7? Compute carefully.", 96),
    ("not a story", "Dear committee, I am writing to apply for the position", 96),
]
# More prompts for the replays, so that a policy is not tuned to eight answers: story openings the demo
# drafter was not fitted to, and text that is not a story.
MORE = [
    ("held out", "The little dog ran to the park", 96),
    ("held out", "Lily and Tom went to the beach", 96),
    ("held out", "There was a big red ball in the garden", 96),
    ("held out", "One day, a boy named Sam", 96),
    ("held out", "The sun was hot and the bird", 96),
    ("held out", "Mom said it was time for bed", 96),
    ("not a story", "The quarterly report shows revenue of", 96),
    ("not a story", "def fibonacci(n):", 96),
    ("not a story", "Photosynthesis converts light into", 96),
    ("not a story", "Step 1: preheat the oven to 180 degrees", 96),
]


def untrained_copy(drafter_dir: Path, into: Path) -> Path:
    """A drafter with `drafter_dir`'s config and random weights (seed 0)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(drafter_dir / "config.json", into / "config.json")
    save_file(random_weights(weight_table(DrafterConfig.from_dir(drafter_dir))), str(into / "model.safetensors"))
    return into


@contextmanager
def pair(target: Path, drafter: Path, untrained: bool = False) -> Iterator[loader.Model]:
    """The pair on the CPU; with `untrained`, the drafter's layout with random weights (the case where
    drafting does not pay)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield loader.load(target, untrained_copy(drafter, Path(tmp) / "untrained") if untrained else drafter,
                          device="cpu")


def pair_arguments(parser: argparse.ArgumentParser, untrained: bool = True) -> None:
    """--target and --drafter (default: the demo pair), and --untrained (the drafter's layout with random weights)."""
    demo_target, demo_drafter = registry.demo_dirs()
    parser.add_argument("--target", type=Path, default=demo_target)
    parser.add_argument("--drafter", type=Path, default=demo_drafter)
    if untrained:
        parser.add_argument("--untrained", action="store_true", help="the drafter's layout with random weights")


@contextmanager
def named_pair(args: argparse.Namespace) -> Iterator[loader.Model]:
    """The pair of `pair_arguments`' flags, named on the report's first line."""
    with pair(args.target, args.drafter, args.untrained) as m:
        print(f"{args.target.name} · drafter {args.drafter.name}{' with random weights' if args.untrained else ''}")
        yield m


def row_name(label: str, text: str) -> str:
    """A prompt's name in the tables: its first 18 characters and its label."""
    return f"{text[:18]}… ({label})" if len(text) > 18 else f"{text} ({label})"


def held_at(m: loader.Model, block_size: int) -> Engine:
    """The speculative engine with every iteration at `block_size`; at 1 it is what auto runs while
    drafting is paused (plain steps, the drafter's context deferred and caught up)."""
    engine = Engine(m.target, m.drafter)
    engine.policy = Pinned(block_size)
    return engine


@dataclass
class Answer:
    """One timed answer: every token (the prefill's first included), the block size and accepted drafts
    of each iteration, and the wall and CPU seconds after the prefill."""

    tokens: list[int]
    sizes: list[int]
    accepted: list[int]
    wall_s: float
    cpu_s: float

    @property
    def decoded(self) -> int:
        return len(self.tokens) - 1

    @property
    def tau(self) -> float:
        return sum(a + 1 for a in self.accepted) / len(self.accepted)


def timed_answer(engine: Engine, ids: list[int], tokens: int,
                 after_prefill: Callable[[], None] | None = None) -> Answer:
    """Generate greedily and time what follows the prefill: by wall clock, and by this thread's CPU
    time, which a shared machine's neighbours do not inflate (torch on one thread, OMP_NUM_THREADS=1).
    `after_prefill` runs between the prefill and the first iteration."""
    steps = engine.generate(Request(ids, tokens))
    first = next(steps)
    if after_prefill is not None:
        after_prefill()
    wall, cpu = time.perf_counter(), time.thread_time()
    out, sizes, accepted = list(first.tokens), [], []
    for step in steps:
        out += step.tokens
        sizes.append(step.block_size)
        accepted.append(step.accepted)
    return Answer(out, sizes, accepted, time.perf_counter() - wall, time.thread_time() - cpu)


@contextmanager
def deferral_buffer(size: int) -> Iterator[None]:
    """Engines made inside hold up to `size` deferred tokens (drafter.DEFERRED, 32): the constant the
    drafter's cache is sized by and the engine's catch-up rule reads."""
    saved = drafter_module.DEFERRED, engine_module.DEFERRED
    drafter_module.DEFERRED = engine_module.DEFERRED = size
    try:
        yield
    finally:
        drafter_module.DEFERRED, engine_module.DEFERRED = saved


# ---- replaying a policy on recorded acceptance ------------------------------------------------------------
@torch.inference_mode()
def acceptance_table(m: loader.Model, answer: list[int], start: int, sizes: list[int]) -> dict[int, list[int]]:
    """accepted[b][t]: drafts accepted of a block of size b whose bonus is `answer[t]` (t ≥ start): the
    drafter fed the target's features of every earlier token, as the engine's context cache holds them
    (a block's drafts depend only on where it starts)."""
    target, drafter = m.target, m.drafter
    cache = target.new_cache(len(answer) + 64, max(sizes))
    ids = torch.tensor(answer, device=target.device)
    _, features = target.forward(ids, cache, feature_layers=drafter.cfg.target_layer_ids, commit=True)
    ctx = drafter.new_cache(len(answer) + 64)
    drafter.add_context(features, ctx)
    k, v = ctx.k.clone(), ctx.v.clone()
    table = {b: [0] * len(answer) for b in sizes}
    for t in range(start, len(answer) - 1):
        for b in sizes:
            ctx.length.fill_(t)
            drafts = drafter.draft(ids[t:t + 1], ctx, b).tolist()
            ctx.k.copy_(k), ctx.v.copy_(v)  # the block's K/V overwrote the context from t on
            truth = answer[t + 1:t + b]
            accepted = 0
            while accepted < len(truth) and drafts[accepted] == truth[accepted]:
                accepted += 1
            table[b][t] = accepted
    return table


def recorded_answer(m: loader.Model, plain: Engine, text: str, tokens: int
                    ) -> tuple[list[int], dict[int, list[int]], int, int]:
    """A prompt's greedy answer (from `plain`, a plain-decoding engine) and its `acceptance_table` for
    every drafting block size auto may pick: (answer tokens, table, start, end)."""
    prompt = encode_raw(m.tokenizer, text)
    out = [t for step in plain.generate(Request(prompt, tokens)) for t in step.tokens]
    answer = prompt + out
    sizes = candidates(m.drafter.cfg.block_size)[1:]
    return out, acceptance_table(m, answer, len(prompt), sizes), len(prompt), len(answer)


def replay(policy: Policy, table: dict[int, list[int]], start: int, end: int, costs: dict[int, float],
           catch_up: float, floor: float | None = None) -> tuple[float, list[int]]:
    """Modelled seconds to decode positions start+1 .. end-1 under `policy`, and the block sizes used.
    The policy decides on `costs` (what the engine measures); a b = 1 iteration is charged `floor`
    (what one costs in a run of them) where given."""
    policy.reset()
    t, seconds, deferred, sizes = start, 0.0, 0, []
    while t < end - 1:
        b = policy.decide(costs).block_size
        if catch_up_due(deferred, b):
            seconds, deferred = seconds + catch_up, 0
        accepted = min(table[b][t], end - 2 - t) if b > 1 else 0
        policy.observe(b, accepted)
        seconds += floor if b == 1 and floor is not None else costs[b]
        deferred += b == 1
        sizes.append(b)
        t += accepted + 1
    if deferred:  # as the engine does when a generation ends in plain iterations
        seconds += catch_up
    return seconds, sizes


@dataclass
class Costs:
    """Seconds per iteration: by b as the engine measures them (`Engine.measure`, which the policy
    decides on), b = 1 in a run of them (`floor`), plain decoding, and one deferred-context catch-up."""

    by_size: dict[int, float]
    floor: float
    plain: float
    catch_up: float

    def describe(self) -> str:
        return (f"iteration cost (ms): plain {self.plain * 1e3:.2f} · b 1 in a row {self.floor * 1e3:.2f} · "
                + " · ".join(f"b {b}: {c * 1e3:.2f}" for b, c in self.by_size.items())
                + f" · catch-up {self.catch_up * 1e3:.2f}")


@torch.inference_mode()
def measured_costs(m: loader.Model) -> Costs:
    """The engine measures its block sizes interleaved, so its b = 1 round follows a b = 8 one and finds
    colder caches (several percent dearer here than in a run of b = 1 iterations). Plain decoding and the
    floor are charged as they run, in a row: b = 1 is timed alone as well, like plain decoding (the policy
    still decides on the engine's own figures). Each is measured three times, alternately, and the fastest
    kept: a busy moment skews one of them only."""
    auto, plain = Engine(m.target, m.drafter, adaptive=True), Engine(m.target)
    for engine in (auto, plain):
        engine.warm_up()
    bonus, context = torch.zeros(1, dtype=torch.int64), list(range(3, 100))  # a context of ~100 tokens
    for engine in (auto, plain):
        list(engine.generate(Request(context, 1)))
    costs, plain_cost, floor, policy = {}, float("inf"), float("inf"), auto.policy
    mode, plain_mode = auto.sampling.load(SamplingParams()), plain.sampling.load(SamplingParams())
    for _ in range(3):
        for b, c in auto.measure(mode, bonus).items():
            costs[b] = min(costs.get(b, c), c)
        auto.policy = Pinned(1)  # measures b = 1 alone
        floor = min(floor, auto.measure(mode, bonus)[1])
        auto.policy = policy
        plain_cost = min(plain_cost, plain.measure(plain_mode, bonus)[1])
    cache = auto.draft_cache
    cache.pending_count.fill_(drafter_module.DEFERRED // 2)
    length = cache.length.clone()

    def catch_up() -> None:  # what the engine's catch-up step runs (eagerly: this is the CPU)
        m.drafter.catch_up(cache)
        cache.length.copy_(length)
        cache.pending_count.fill_(drafter_module.DEFERRED // 2)
    return Costs(costs, floor, plain_cost, time_iterations({0: catch_up}, m.target.device)[0])
