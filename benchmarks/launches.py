"""Device launches per step, per layer kind, for every family (issue 26), counted on the CPU.

Each family's tiny checkpoint (tests/tiny.py, tests/tiny_gpt_oss.py) is loaded on the stand-in GPU
(tests/fake_cuda.py) with the Triton kernels in the interpreter, the engine captures its device step,
and the capture's recording (what a CUDA graph replays) is counted: Triton launches plus the torch ops
that run a kernel, views, metadata and allocations excluded (tests/launch_count.py lists them). Per
layer kind by difference (the model with one more layer of that kind, less the model), the rest is
the step's fixed work. `decode`: a plain decoding step (b = 1, no drafter); `verify`: one DFlash
iteration at b = 4 (draft, verify, accept, commit, drafter context). Counts do not depend on the
model's width, so the tiny models count what a released one launches per layer (a released model's
per-step total is fixed + layers × per layer).

Each cell prints `count / budget`: the budget is issue 26's (which needs its fusions); tests/test_launches.py
holds today's counts as ceilings so they cannot creep up.

Usage: python benchmarks/launches.py [--family NAME ...] [--ops] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.conftest  # noqa: E402,F401  (transformers' hybrid references import without fla, as in the tests)
from tests.launch_count import BUDGETS, FAMILIES, count_family  # noqa: E402


# The released target each family stands for (its layer count from dflash_cli.synthetic, the `--synthetic`
# configs), for an estimate of its decode step: fixed + layers × launches per layer.
RELEASED = {"dense": "qwen3-8b", "hybrid": "qwen3.5-27b", "moe": "qwen3-coder-30b-a3b",
            "hybrid-moe": "qwen3.5-35b-a3b", "gpt-oss": "gpt-oss-20b"}


def released_layers(family: str) -> dict[str, int]:
    from dflash_cli.synthetic import TARGETS

    n = TARGETS[RELEASED[family]]["num_hidden_layers"]
    full = n // 4  # Qwen3.5: every 4th layer is gated full attention, the rest linear attention
    return {"dense": {"dense": n}, "moe": {"moe": n}, "hybrid": {"linear": n - full, "full": full},
            "hybrid-moe": {"linear+moe": n - full, "full+moe": full},
            "gpt-oss": {"gpt-oss sliding": n // 2, "gpt-oss full": n - n // 2}}[family]


def released_table(results) -> str:
    rows = ["| family | released target | layers | decode launches (est.) | at the issue's budgets |",
            "| --- | --- | --- | --- | --- |"]
    for c in results:
        if c.family not in RELEASED or "decode" not in c.per_layer:
            continue
        layers = released_layers(c.family)
        now = c.fixed["decode"] + sum(n * c.per_layer["decode"][k] for k, n in layers.items())
        budget = BUDGETS["fixed"] + sum(n * BUDGETS[k] for k, n in layers.items())
        rows.append(f"| {c.family} | {RELEASED[c.family]} | "
                    + " + ".join(f"{n} {k}" for k, n in layers.items()) + f" | {now} | {budget} |")
    return "\n".join(rows)


def table(results) -> str:
    kinds = list(dict.fromkeys(k for c in results for step in c.per_layer.values() for k in step))
    head = ["family", "step", *[f"{k} (≤{BUDGETS[k]})" for k in kinds], f"fixed (≤{BUDGETS['fixed']})",
            "total (tiny)"]
    rows = [head, ["---"] * len(head)]
    for c in results:
        for step in ("decode", "verify"):
            cells = [str(c.per_layer[step][k]) if k in c.per_layer[step] else "" for k in kinds]
            rows.append([c.family, step, *cells, str(c.fixed[step]), str(c.total[step])])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these (default: all)")
    ap.add_argument("--ops", action="store_true", help="also print each kind's launches by op")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    args = ap.parse_args()
    results, start = [], time.perf_counter()
    for name in args.family or FAMILIES:
        results.append(count_family(FAMILIES[name]))
        print(f"counted {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print("Launches per layer (by kind) and per step's fixed work; the issue's budget beside each kind.")
    print(table(results))
    print()
    print("A released target's decode step, estimated: fixed + its layers × launches per layer.")
    print(released_table(results))
    if args.ops:
        for c in results:
            for step in ("decode", "verify"):
                for kind, ops in c.ops[step].items():
                    print(f"{c.family} {step} {kind}: " + ", ".join(f"{op} {n}" for op, n in ops.items()))
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
