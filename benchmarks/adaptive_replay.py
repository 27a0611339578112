"""Replays the auto block-size policy on recorded acceptance, prompt by prompt (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_replay.py [--untrained] [--prompts bench|all]

Timed runs of a 2 ms iteration on a shared CPU are noisy, and each policy change needs all of them
again. This separates the two things the policy's speed depends on. First, what the drafter would
get right: for every position t of each greedy answer, how many drafts a block of size b started at
t would have had accepted (the drafter fed the target's features of every earlier token, as the
engine's context cache holds them; a block's drafts depend only on where it starts). Second, what
an iteration costs at each b on this machine: the engine's own measurement (`Engine.measure`), which
the policy decides on; b = 1 and plain decoding timed in a row, as paused stretches run; and the
drafter's deferred-context catch-up. Replaying a policy on those is
exact arithmetic: the positions it visits, the block sizes it picks, and its modelled time, against
plain decoding and fixed B on the same answer. `benchmarks/adaptive.py` times the real thing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dflash_cli import loader, registry  # noqa: E402
from dflash_cli.adaptive import Adaptive, Pinned, Policy, candidates, time_iterations  # noqa: E402
from dflash_cli.drafter import DEFERRED  # noqa: E402
from dflash_cli.engine import Engine, Request, catch_up_due  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402
from dflash_cli.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive import PROMPTS, row_name, untrained_copy  # noqa: E402

# More prompts than the timed benchmark's, so that a policy is not tuned to eight answers: story
# openings the demo drafter was not fitted to, and text that is not a story.
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


@torch.inference_mode()
def acceptance_table(m: loader.Model, answer: list[int], start: int, sizes: list[int]) -> dict[int, list[int]]:
    """accepted[b][t]: drafts accepted of a block of size b whose bonus is `answer[t]` (t ≥ start)."""
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


@torch.inference_mode()
def measured_costs(m: loader.Model) -> tuple[dict[int, float], float, float, float]:
    """Iteration seconds by b (the engine's measurement), b = 1's in a run of them, plain decoding's,
    and a catch-up's."""
    auto, plain = Engine(m.target, m.drafter, adaptive=True), Engine(m.target)
    for engine in (auto, plain):
        engine.warm_up()
    bonus, context = torch.zeros(1, dtype=torch.int64), list(range(3, 100))  # a context of ~100 tokens
    for engine in (auto, plain):
        list(engine.generate(Request(context, 1)))
    # The engine times its block sizes interleaved, so its b = 1 round follows a b = 8 one and finds
    # colder caches (several percent dearer here than in a run of b = 1 iterations). Plain decoding and the
    # floor are charged as they run, in a row: b = 1 is timed alone as well, like plain decoding (the
    # policy still decides on the engine's own figures). Each is measured three times, alternately, and
    # the fastest kept: a busy moment skews one of them only.
    costs, plain_cost, floor, sizes = {}, float("inf"), float("inf"), auto.policy.sizes
    mode, plain_mode = auto.sampling.load(SamplingParams()), plain.sampling.load(SamplingParams())
    for _ in range(3):
        for b, c in auto.measure(mode, bonus).items():
            costs[b] = min(costs.get(b, c), c)
        auto.policy.sizes = [1]
        floor = min(floor, auto.measure(mode, bonus)[1])
        auto.policy.sizes = sizes
        plain_cost = min(plain_cost, plain.measure(plain_mode, bonus)[1])
    auto.draft_cache.pending_count.fill_(DEFERRED // 2)
    length = auto.draft_cache.length.clone()

    def catch_up() -> None:
        auto._catch_up(bonus)
        auto.draft_cache.length.copy_(length)
        auto.draft_cache.pending_count.fill_(DEFERRED // 2)
    catch = time_iterations({0: catch_up}, m.target.device)[0]
    return costs, floor, plain_cost, catch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo_target, demo_drafter = registry.demo_dirs()
    parser.add_argument("--target", type=Path, default=demo_target)
    parser.add_argument("--drafter", type=Path, default=demo_drafter)
    parser.add_argument("--untrained", action="store_true", help="the drafter's layout with random weights")
    parser.add_argument("--prompts", choices=("bench", "all"), default="all",
                        help="the timed benchmark's eight prompts, or those and ten more")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        drafter = untrained_copy(args.drafter, Path(tmp) / "untrained") if args.untrained else args.drafter
        m = loader.load(args.target, drafter, device="cpu")
        print(f"{args.target.name} · drafter {args.drafter.name}{' with random weights' if args.untrained else ''}")
        costs, floor, plain_cost, catch = measured_costs(m)
        print("iteration cost (ms): plain " + f"{plain_cost * 1e3:.2f} · b 1 in a row {floor * 1e3:.2f} · " +
              " · ".join(f"b {b}: {c * 1e3:.2f}" for b, c in costs.items()) + f" · catch-up {catch * 1e3:.2f}")
        run(m, costs, floor, plain_cost, catch, PROMPTS + (MORE if args.prompts == "all" else []))


def run(m: loader.Model, costs: dict[int, float], floor: float, plain_cost: float, catch: float,
        prompts: list) -> None:
    largest = max(costs)
    plain_engine = Engine(m.target)
    print(f"{'prompt':<36} {'tok':>4} {'τ B':>5} | {'plain':>6} {'B':>6} {'auto':>6} | {'auto/best':>9} | auto chose")
    ratios = []
    for label, text, tokens in prompts:
        out, table, start, end = recorded_answer(m, plain_engine, text, tokens)
        plain_s = (end - 1 - start) * plain_cost
        fixed_s, fixed_sizes = replay(Pinned(largest), table, start, end, costs, catch)
        auto_s, auto_sizes = replay(Adaptive(largest), table, start, end, costs, catch, floor)
        tau = (end - 1 - start) / len(fixed_sizes)
        ratios.append(min(plain_s, fixed_s) / auto_s)
        mix = {b: auto_sizes.count(b) for b in sorted(set(auto_sizes))}
        name = row_name(label, text)
        n = end - 1 - start
        print(f"{name:<36} {len(out):>4} {tau:>5.2f} | {n / plain_s:>6.0f} {n / fixed_s:>6.0f} {n / auto_s:>6.0f} | "
              f"{ratios[-1]:>9.2f} | " + " ".join(f"b{b}×{c}" for b, c in mix.items()))
    print(f"auto / better of plain and B={largest} (modelled): worst {min(ratios):.2f}, "
          f"geometric mean {statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
