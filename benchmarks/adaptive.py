"""Auto block size against a fixed block and plain decoding, prompt by prompt (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive.py [--untrained] [--target DIR --drafter DIR] [--repeats 5] [--prompts 8]

(default: the shipped demo pair, stories260K and its trained drafter; `--untrained` swaps in a drafter
of the same layout with random weights, which is right about as often as chance: the case where
drafting does not pay). Three engines share the weights: plain decoding
(no drafter), DFlash at the drafter's block size B, and auto (`--block-size auto`, the default). Each
prompt runs `--repeats` times per arm, the arms interleaved so that a busy moment on a shared machine
hits them alike; the figures are medians. Decode speed is tokens after the first over the time after
the prefill (as `dflash bench` reports it); "cpu" is the same over this thread's CPU time, which a
shared machine's neighbours do not inflate (torch runs on one thread with OMP_NUM_THREADS=1). The last
columns are auto's speed over the better of plain and fixed B, and the block sizes auto chose, averaged
over the runs (each answer starts from the prior). A fourth
arm, "b1", is the speculative engine held at b = 1: plain decoding plus the features it defers and a
catch-up every 32 tokens, the floor under auto where drafting does not pay (cpu time only).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_common import PROMPTS, held_at, named_pair, pair_arguments, row_name, timed_answer  # noqa: E402

from dflash_cli import loader  # noqa: E402
from dflash_cli.engine import Engine  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts only (a quick look)")
    args = parser.parse_args()
    with named_pair(args) as m:
        report(m, args.repeats, PROMPTS[:args.prompts])


def report(m: loader.Model, repeats: int, prompts: list) -> None:
    arms = {"plain": Engine(m.target), "fixed": Engine(m.target, m.drafter),
            "auto": Engine(m.target, m.drafter, adaptive=True), "b1": held_at(m, 1)}
    for engine in arms.values():  # first calls pay for allocation; auto measures its costs here
        engine.warm_up()
        timed_answer(engine, encode_raw(m.tokenizer, "Hello"), 16)
    costs = next(iter(arms["auto"].costs.table.values()))
    b = arms["fixed"].block_size
    print(f"auto's measured iteration cost (ms): " + " · ".join(f"b {k}: {v * 1e3:.2f}" for k, v in costs.items()))
    print(f"break-even τ: " + " · ".join(f"b {k}: {v / costs[1]:.2f}" for k, v in costs.items() if k > 1))
    head = (f"{'prompt':<36} {'tok':>4} {'τ B':>5} | {'plain':>6} {'B=' + str(b):>6} {'auto':>6} | "
            f"{'cpu: plain':>10} {'B':>6} {'auto':>6} {'b1':>6} | {'auto/best':>9} {'(cpu)':>6} | auto chose (per run)")
    print(head)
    print("-" * len(head))
    ratios, cpu_ratios, floors = [], [], []
    for label, text, tokens in prompts:
        ids = encode_raw(m.tokenizer, text)
        runs = {name: [] for name in arms}
        for _ in range(repeats):
            for name, engine in arms.items():
                runs[name].append(timed_answer(engine, ids, tokens))
        assert all(r[0].tokens == runs["plain"][0].tokens for r in runs.values()), text
        med = {name: {"decode": statistics.median(r.decoded / r.wall_s for r in rs),
                      "cpu": statistics.median(r.decoded / r.cpu_s for r in rs)} for name, rs in runs.items()}
        best = max(med["plain"]["decode"], med["fixed"]["decode"])
        best_cpu = max(med["plain"]["cpu"], med["fixed"]["cpu"])
        ratios.append(med["auto"]["decode"] / best)
        cpu_ratios.append(med["auto"]["cpu"] / best_cpu)
        floors.append(med["b1"]["cpu"] / med["plain"]["cpu"])
        mix = Counter(b for r in runs["auto"] for b in r.sizes)  # every run (each starts from the last)
        name = row_name(label, text)
        print(f"{name:<36} {len(runs['plain'][0].tokens):>4} {runs['fixed'][0].tau:>5.2f} | "
              f"{med['plain']['decode']:>6.0f} {med['fixed']['decode']:>6.0f} {med['auto']['decode']:>6.0f} | "
              f"{med['plain']['cpu']:>10.0f} {med['fixed']['cpu']:>6.0f} {med['auto']['cpu']:>6.0f} "
              f"{med['b1']['cpu']:>6.0f} | "
              f"{ratios[-1]:>9.2f} {cpu_ratios[-1]:>6.2f} | "
              + " ".join(f"b{k}×{v / repeats:.0f}" for k, v in sorted(mix.items())))
    print(f"auto / better of plain and B={b}, decode tok/s: worst {min(ratios):.2f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.2f} (cpu time: worst {min(cpu_ratios):.2f}, "
          f"geometric mean {statistics.geometric_mean(cpu_ratios):.2f}); same tokens in every arm")
    print(f"b1 / plain, cpu time (b = 1 with the drafter's context deferred): "
          f"geometric mean {statistics.geometric_mean(floors):.2f}")


if __name__ == "__main__":
    main()
