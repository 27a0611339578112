"""Policy variants for the auto block size, replayed side by side (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_frontier.py [--count N] [--variants N]

Where drafting costs over two plain steps (this CPU with the demo pair, or a MoE target on a GPU),
an auto policy trades two failures against each other: a drafter that starts badly and then does well
(the trained demo drafter on several prompts) wants drafting to resume soon, a drafter that never
pays (the same layout with random weights) wants it to stop soon and stay stopped. This replays each
variant on the same recorded acceptance and measured costs as `adaptive_replay.py` (adaptive_common.py), for both
drafters, and prints auto over the better of plain and fixed B: worst prompt and geometric mean.
Each variant is a few lines here; the shipped policy is `dflash_cli.adaptive.Adaptive`.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_common import MORE, PROMPTS, measured_costs, pair, recorded_answer, replay  # noqa: E402

from dflash_cli import adaptive, loader, registry  # noqa: E402
from dflash_cli.adaptive import Acceptance, Adaptive, Decision, Pinned  # noqa: E402
from dflash_cli.engine import Engine  # noqa: E402


class Chained(Acceptance):
    """A position's prior is the estimate of the position before it (capped at PRIOR), so one
    rejected first draft also lowers what the unreached positions are expected to do."""

    def rates(self) -> list[float]:
        out, prior = [], self.prior
        for h, n in zip(self.hits, self.seen):
            out.append((h + adaptive.PRIOR_WEIGHT * prior) / (n + adaptive.PRIOR_WEIGHT))
            prior = min(self.prior, out[-1])
        return out


class ChainedPolicy(Adaptive):
    def reset(self) -> None:
        super().reset()
        self.acceptance = Chained(self.acceptance.positions)


class Mixture(Adaptive):
    """Two hypotheses: the drafter works on this text (the per-position estimates) or it does not
    (every draft accepted with chance EPS). Expected tokens mix the two by the posterior, which each
    judged draft updates and which forgets towards the prior like the estimates do."""

    P0, EPS = 0.9, 0.02

    def reset(self) -> None:
        super().reset()
        self.log_odds = math.log(self.P0 / (1 - self.P0))

    def observe(self, block_size: int, accepted: int) -> None:
        rates, prior = self.acceptance.rates(), math.log(self.P0 / (1 - self.P0))
        if block_size > 1:
            self.log_odds = prior + adaptive.OBSERVED * (self.log_odds - prior)
        for i in range(min(accepted + 1, block_size - 1)):
            r = rates[i]
            self.log_odds += math.log(r / self.EPS) if i < accepted else math.log((1 - r) / (1 - self.EPS))
        super().observe(block_size, accepted)

    def decide(self, costs: dict[int, float] | None) -> Decision:
        works = 1 / (1 + math.exp(-self.log_odds))
        sizes = sorted(costs)
        fails = Acceptance(self.acceptance.positions, prior=self.EPS)  # every rate EPS
        tau = {b: works * self.acceptance.expected_tokens(b) + (1 - works) * fails.expected_tokens(b) for b in sizes}
        best = max(sizes, key=lambda b: (tau[b] / costs[b], -b))
        if best > 1:
            self.budget = 0.0
            return Decision(best, tau[best], costs[best] / costs[1])
        rival = max(sizes[1:], key=lambda b: (tau[b] / costs[b], -b))
        if self.budget >= costs[rival] - tau[rival] * costs[1]:
            self.budget = 0.0
            return Decision(rival, tau[rival], costs[rival] / costs[1], probe=True)
        self.budget += adaptive.PROBE_SHARE * costs[1]
        return Decision(1, 1.0, 1.0, rival, tau[rival], costs[rival] / costs[1])


class Carried(Adaptive):
    """The next answer starts from this one's evidence, weighing at most CARRY observations per position
    (the shipped policy starts every answer from the prior)."""

    CARRY = 2.0

    def reset(self) -> None:
        old = self.acceptance
        super().reset()
        for i, (h, n) in enumerate(zip(old.hits, old.seen)):
            if n > adaptive.START:
                scale = min(1.0, self.CARRY / n)
                self.acceptance.hits[i], self.acceptance.seen[i] = h * scale, n * scale


def constants(**values) -> Callable[[], None]:
    """Set adaptive's module constants (read at run time) and return what undoes it."""
    saved = {k: getattr(adaptive, k) for k in values}
    for k, v in values.items():
        setattr(adaptive, k, v)
    return lambda: [setattr(adaptive, k, v) for k, v in saved.items()]


VARIANTS: list[tuple[str, Callable[[int], Adaptive], dict]] = [
    ("shipped (PROBE_SHARE 0.02, START 1)", Adaptive, {}),
    ("probes: share 0.01", Adaptive, {"PROBE_SHARE": 0.01}),
    ("probes: share 0.04", Adaptive, {"PROBE_SHARE": 0.04}),
    ("probes: share 0.08", Adaptive, {"PROBE_SHARE": 0.08}),
    ("start: 0.5 observations at the prior", Adaptive, {"START": 0.5}),
    ("start: 2 observations at the prior", Adaptive, {"START": 2.0}),
    ("memory: OBSERVED 0.9", Adaptive, {"OBSERVED": 0.9}),
    ("chained prior across positions", ChainedPolicy, {}),
    ("two hypotheses (works / does not)", Mixture, {}),
    ("evidence carried to the next answer", Carried, {}),
]


def record(m: loader.Model, prompts: list) -> list[tuple[dict, int, int]]:
    """(acceptance table, start, end) of each prompt's greedy answer."""
    plain = Engine(m.target)
    return [recorded_answer(m, plain, text, tokens)[1:] for _, text, tokens in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None, help="the first N prompts only (a quick look)")
    parser.add_argument("--variants", type=int, default=None, help="the first N variants only (a quick look)")
    args = parser.parse_args()
    demo_target, demo_drafter = registry.demo_dirs()
    prompts = (PROMPTS + MORE)[:args.count]
    cases = {}
    for name, untrained in (("trained", False), ("random", True)):
        with pair(demo_target, demo_drafter, untrained) as m:
            cases[name] = (record(m, prompts), measured_costs(m))
    print(f"{len(prompts)} prompts; auto / better of plain and B=8 (modelled), worst prompt and geometric mean")
    print(f"{'variant':<40} {'trained drafter':>18} {'random drafter':>18}")
    for label, make, values in VARIANTS[:args.variants]:
        undo = constants(**values)
        cells = []
        for rows, costs in cases.values():
            largest, ratios, policy = max(costs.by_size), [], make(max(costs.by_size))
            for table, start, end in rows:
                fixed, _ = replay(Pinned(largest), table, start, end, costs.by_size, costs.catch_up)
                if not isinstance(policy, Carried):
                    policy = make(largest)
                auto, _ = replay(policy, table, start, end, costs.by_size, costs.catch_up, costs.floor)
                ratios.append(min((end - 1 - start) * costs.plain, fixed) / auto)
            cells.append(f"{min(ratios):.2f} / {statistics.geometric_mean(ratios):.2f}")
        undo()
        print(f"{label:<40} {cells[0]:>18} {cells[1]:>18}")


if __name__ == "__main__":
    main()
