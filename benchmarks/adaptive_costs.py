"""Are the measured iteration costs what iterations really cost? (a script, not a test)

    OMP_NUM_THREADS=1 python benchmarks/adaptive_costs.py [--trials 6] [--target DIR --drafter DIR]

Auto decides on costs it measures once per context bucket (`Engine.measure`: a few interleaved rounds
of each block size). This compares the break-even τ that measurement gives, cost(B) / cost(1), with
the one real answers give: engines pinned at b = 1 and at b = B decode the same prompt, and their CPU
time per iteration (host work included) is divided. Each trial measures afresh and keeps, from the
same rounds, the fastest round (what the engine keeps) and the median (what it kept before), so
their spread over the trials shows how far one measurement can be off. CPU only: on a GPU the engine
times device work with CUDA events.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli import adaptive, loader, registry  # noqa: E402
from dflash_cli.adaptive import Pinned  # noqa: E402
from dflash_cli.engine import Engine, Request  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402

PROMPT = "Every morning, the baker"


def per_iteration(engine: Engine, ids: list[int], tokens: int) -> float:
    """CPU seconds per iteration of one answer, after the prefill."""
    steps = engine.generate(Request(ids, tokens))
    next(steps)
    start, n = time.thread_time(), 0
    for _ in steps:
        n += 1
    return (time.thread_time() - start) / n


def measured(engine: Engine, ids: list[int]) -> dict[str, dict[int, float]]:
    """The engine's measurement at this prompt's context, reduced both ways from the same rounds."""
    rounds: dict[int, list[float]] = {}
    keep = adaptive.KEEP

    def keep_rounds(times: list[float]) -> float:
        rounds[len(rounds)] = list(times)
        return keep(times)
    engine.costs.table.clear()
    adaptive.KEEP = keep_rounds
    try:
        list(engine.generate(Request(ids, 2)))  # the first iteration measures
    finally:
        adaptive.KEEP = keep
    sizes = engine.policy.sizes
    return {"fastest": {b: min(rounds[i]) for i, b in enumerate(sizes)},
            "median": {b: statistics.median(rounds[i]) for i, b in enumerate(sizes)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo_target, demo_drafter = registry.demo_dirs()
    parser.add_argument("--target", type=Path, default=demo_target)
    parser.add_argument("--drafter", type=Path, default=demo_drafter)
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    m = loader.load(args.target, args.drafter, device="cpu")
    ids = encode_raw(m.tokenizer, PROMPT)
    auto = Engine(m.target, m.drafter, adaptive=True)
    largest = auto.block_size
    pinned = {b: Engine(m.target, m.drafter) for b in (1, largest)}
    for b, engine in pinned.items():
        engine.policy = Pinned(b)
        per_iteration(engine, ids, 16)
    auto.warm_up()
    print(f"break-even τ of b = {largest} (cost of an iteration at b = {largest} over one at b = 1), "
          f"{PROMPT!r}, {len(ids)}-token prompt")
    print(f"{'trial':>5} | {'real answers':>12} | {'measured: fastest':>17} {'median':>7}")
    rows = []
    for trial in range(args.trials):
        real = {b: statistics.median(per_iteration(e, ids, 64) for _ in range(3)) for b, e in pinned.items()}
        m_ = measured(auto, ids)
        row = (real[largest] / real[1], m_["fastest"][largest] / m_["fastest"][1],
               m_["median"][largest] / m_["median"][1])
        rows.append(row)
        print(f"{trial + 1:>5} | {row[0]:>12.2f} | {row[1]:>17.2f} {row[2]:>7.2f}")
    for i, name in ((1, "fastest"), (2, "median")):
        errors = [r[i] / r[0] - 1 for r in rows]
        print(f"{name:>8}: off the real break-even by {min(errors):+.0%} to {max(errors):+.0%}")


if __name__ == "__main__":
    main()
