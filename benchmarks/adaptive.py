"""Auto block size against a fixed block and plain decoding, prompt by prompt (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive.py [--untrained] [--target DIR --drafter DIR]

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
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from dflash_cli import loader, registry  # noqa: E402
from dflash_cli.adaptive import Pinned  # noqa: E402
from dflash_cli.config import DrafterConfig  # noqa: E402
from dflash_cli.drafter import weight_table  # noqa: E402
from dflash_cli.models.weights import random_weights  # noqa: E402
from dflash_cli.engine import Engine, Request  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402

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


def untrained_copy(drafter_dir: Path, into: Path) -> Path:
    """A drafter with `drafter_dir`'s config and random weights (seed 0)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(drafter_dir / "config.json", into / "config.json")
    save_file(random_weights(weight_table(DrafterConfig.from_dir(drafter_dir))), str(into / "model.safetensors"))
    return into


def row_name(label: str, text: str) -> str:
    """A prompt's name in the tables: its first 18 characters and its label."""
    return f"{text[:18]}… ({label})" if len(text) > 18 else f"{text} ({label})"


def generate(engine: Engine, ids: list[int], tokens: int) -> dict:
    """One answer: decode speed by wall clock and by CPU time, what was written, block sizes and τ."""
    steps = engine.generate(Request(ids, tokens))
    first = next(steps)  # the prefill
    wall, cpu = time.perf_counter(), time.thread_time()
    out, sizes, taus = list(first.tokens), [], []
    for step in steps:
        out += step.tokens
        sizes.append(step.block_size)
        taus.append(step.acceptance_length)
    wall_end, cpu_end = time.perf_counter(), time.thread_time()
    return {"tokens": out, "decode": (len(out) - 1) / (wall_end - wall), "cpu": (len(out) - 1) / (cpu_end - cpu),
            "sizes": sizes, "tau": sum(taus) / len(taus)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo_target, demo_drafter = registry.demo_dirs()
    parser.add_argument("--target", type=Path, default=demo_target)
    parser.add_argument("--drafter", type=Path, default=demo_drafter)
    parser.add_argument("--untrained", action="store_true", help="the drafter's layout with random weights")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        drafter = untrained_copy(args.drafter, Path(tmp) / "untrained") if args.untrained else args.drafter
        m = loader.load(args.target, drafter, device="cpu")
        print(f"{args.target.name} · drafter {args.drafter.name}{' with random weights' if args.untrained else ''}")
        report(m, args.repeats)


def report(m: loader.Model, repeats: int) -> None:
    arms = {"plain": Engine(m.target), "fixed": Engine(m.target, m.drafter),
            "auto": Engine(m.target, m.drafter, adaptive=True), "b1": Engine(m.target, m.drafter)}
    arms["b1"].policy = Pinned(1)  # every iteration at b = 1, its drafter context deferred and caught up
    for engine in arms.values():  # first calls pay for allocation; auto measures its costs here
        engine.warm_up()
        generate(engine, encode_raw(m.tokenizer, "Hello"), 16)
    costs = next(iter(arms["auto"].costs.table.values()))
    b = arms["fixed"].block_size
    print(f"auto's measured iteration cost (ms): " + " · ".join(f"b {k}: {v * 1e3:.2f}" for k, v in costs.items()))
    print(f"break-even τ: " + " · ".join(f"b {k}: {v / costs[1]:.2f}" for k, v in costs.items() if k > 1))
    head = (f"{'prompt':<36} {'tok':>4} {'τ B':>5} | {'plain':>6} {'B=' + str(b):>6} {'auto':>6} | "
            f"{'cpu: plain':>10} {'B':>6} {'auto':>6} {'b1':>6} | {'auto/best':>9} {'(cpu)':>6} | auto chose (per run)")
    print(head)
    print("-" * len(head))
    ratios, cpu_ratios, floors = [], [], []
    for label, text, tokens in PROMPTS:
        ids = encode_raw(m.tokenizer, text)
        runs = {name: [] for name in arms}
        for _ in range(repeats):
            for name, engine in arms.items():
                runs[name].append(generate(engine, ids, tokens))
        assert all(r[0]["tokens"] == runs["plain"][0]["tokens"] for r in runs.values()), text
        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("decode", "cpu")}
               for name, rs in runs.items()}
        best = max(med["plain"]["decode"], med["fixed"]["decode"])
        best_cpu = max(med["plain"]["cpu"], med["fixed"]["cpu"])
        ratios.append(med["auto"]["decode"] / best)
        cpu_ratios.append(med["auto"]["cpu"] / best_cpu)
        floors.append(med["b1"]["cpu"] / med["plain"]["cpu"])
        mix = Counter(b for r in runs["auto"] for b in r["sizes"])  # every run (each starts from the last)
        name = row_name(label, text)
        print(f"{name:<36} {len(runs['plain'][0]['tokens']):>4} {runs['fixed'][0]['tau']:>5.2f} | "
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
