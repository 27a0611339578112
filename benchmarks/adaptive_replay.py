"""Replays the auto block-size policy on recorded acceptance, prompt by prompt (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_replay.py [--untrained] [--prompts bench|all] [--count N]

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_common import (MORE, PROMPTS, Costs, measured_costs, named_pair, pair_arguments,  # noqa: E402
                             recorded_answer, replay, row_name)

from dflash_cli import loader  # noqa: E402
from dflash_cli.adaptive import Adaptive, Pinned  # noqa: E402
from dflash_cli.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--prompts", choices=("bench", "all"), default="all",
                        help="the timed benchmark's eight prompts, or those and ten more")
    parser.add_argument("--count", type=int, default=None, help="the first N of those prompts only (a quick look)")
    args = parser.parse_args()
    with named_pair(args) as m:
        costs = measured_costs(m)
        print(costs.describe())
        run(m, costs, (PROMPTS + (MORE if args.prompts == "all" else []))[:args.count])


def run(m: loader.Model, costs: Costs, prompts: list) -> None:
    largest = max(costs.by_size)
    plain_engine = Engine(m.target)
    print(f"{'prompt':<36} {'tok':>4} {'τ B':>5} | {'plain':>6} {'B':>6} {'auto':>6} | {'auto/best':>9} | auto chose")
    ratios = []
    for label, text, tokens in prompts:
        out, table, start, end = recorded_answer(m, plain_engine, text, tokens)
        plain_s = (end - 1 - start) * costs.plain
        fixed_s, fixed_sizes = replay(Pinned(largest), table, start, end, costs.by_size, costs.catch_up)
        auto_s, auto_sizes = replay(Adaptive(largest), table, start, end, costs.by_size, costs.catch_up, costs.floor)
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
