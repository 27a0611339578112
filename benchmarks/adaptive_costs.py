"""Are the measured iteration costs what iterations really cost? (a script, not a test)

    OMP_NUM_THREADS=1 python benchmarks/adaptive_costs.py [--trials 6] [--tokens 64] [--target DIR --drafter DIR]

Auto decides on costs it measures once per context bucket (`Engine.measure`: a few interleaved rounds
of each block size). This compares the break-even τ that measurement gives, cost(b) / cost(1), with
the one real answers give: engines pinned at each b decode the same prompt, and their CPU time per
iteration (host work included) is divided by b = 1's. Each trial measures afresh and keeps, from the
same rounds, the fastest round (what the engine keeps) and the median (what it kept before), so
their spread over the trials shows how far one measurement can be off. CPU only: on a GPU the engine
times device work with CUDA events.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_common import held_at, pair_arguments, timed_answer  # noqa: E402

from dflash_cli import adaptive, loader  # noqa: E402
from dflash_cli.engine import Engine, Request  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402

PROMPT = "Every morning, the baker"


def per_iteration(engine: Engine, ids: list[int], tokens: int) -> float:
    """CPU seconds per iteration of one answer, after the prefill."""
    answer = timed_answer(engine, ids, tokens)
    return answer.cpu_s / len(answer.sizes)


def measured(engine: Engine, ids: list[int]) -> dict[str, dict[int, float]]:
    """The engine's measurement at this prompt's context, reduced both ways from the same rounds."""
    rounds: dict[int, list[float]] = {}
    keep = adaptive.KEEP

    def keep_rounds(times: list[float]) -> float:  # adaptive.KEEP: what the rounds of each b become
        rounds[len(rounds)] = list(times)
        return keep(times)
    engine.costs.table.clear()  # measured afresh at the next iteration
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
    pair_arguments(parser, untrained=False)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64, help="each real answer's length")
    args = parser.parse_args()
    m = loader.load(args.target, args.drafter, device="cpu")
    ids = encode_raw(m.tokenizer, PROMPT)
    auto = Engine(m.target, m.drafter, adaptive=True)
    sizes = auto.policy.sizes
    pinned = {b: held_at(m, b) for b in sizes}
    for engine in pinned.values():
        per_iteration(engine, ids, 16)
    auto.warm_up()
    print(f"break-even τ of each b (cost of an iteration at b over one at b = 1), {PROMPT!r}, "
          f"{len(ids)}-token prompt: real answers, and the engine's measurement kept as the fastest "
          f"round or the median")
    drafting = sizes[1:]
    print(f"{'trial':>5} | " + " | ".join(f"b {b}: {'real':>5} {'fast':>5} {'med':>5}" for b in drafting))
    errors: dict[str, dict[int, list[float]]] = {"fastest": {b: [] for b in drafting},
                                                  "median": {b: [] for b in drafting}}
    for trial in range(args.trials):
        real = {b: statistics.median(per_iteration(e, ids, args.tokens) for _ in range(3)) for b, e in pinned.items()}
        got = measured(auto, ids)
        cells = []
        for b in drafting:
            even = {k: got[k][b] / got[k][1] for k in got}
            truth = real[b] / real[1]
            for k in got:
                errors[k][b].append(even[k] / truth - 1)
            cells.append(f"b {b}: {truth:>5.2f} {even['fastest']:>5.2f} {even['median']:>5.2f}")
        print(f"{trial + 1:>5} | " + " | ".join(cells))
    for k, by_size in errors.items():
        print(f"{k:>8}: off the real break-even by " + " · ".join(
            f"b {b} {min(e):+.0%}..{max(e):+.0%}" for b, e in by_size.items()))


if __name__ == "__main__":
    main()
