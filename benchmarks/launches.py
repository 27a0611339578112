"""Device launches per step, per layer kind, for every family (issue 26), counted on the CPU.

Each family's tiny checkpoint (tests/tiny.py, tests/tiny_gpt_oss.py) is loaded on the stand-in GPU
(tests/fake_cuda.py) with the Triton kernels in the interpreter, the engine captures its device step,
and the capture's recording (what a CUDA graph replays) is counted: Triton launches plus the torch ops
that run a kernel, views, metadata and allocations excluded (tests/launch_count.py lists them). Per
layer kind by difference (the model with one more layer of that kind, less the model), the rest is
the step's fixed work. `decode`: a plain decoding step (b = 1, no drafter); `verify`: one DFlash
iteration at b = 4 (draft, verify, accept, commit, drafter context); `tree N`: one tree iteration at b = 4
(draft, the best-first tree of N nodes, its verify under the ancestor mask, the walk, the path's commit),
for the families that verify trees (not DFlash2: its drafters keep their selector chain). Each DFLASH_LINEAR mode is counted
(`cublas`: F.linear; `invariant`: the batch-invariant kernels, with the norm and SwiGLU fused in).

A released target's decode step is estimated as fixed + layers × launches per layer, at its real widths:
the tiny models' counts, plus what a projection launches at its real N × K beyond its one launch at a tiny
width (where every weight is reduced in one slice). That is found by running the invariant linear launcher
on each of the released layer's weights on meta tensors, launches counted, not run
(tests/launch_count.real_projections). Under cublas a projection is one F.linear at any width (cuBLAS may
add a split-K reduction kernel of its own at M = 1, which no CPU count sees).

Each cell prints `count / budget`: the budget is issue 26's (which needs its fusions); tests/test_launches.py
holds today's counts as ceilings so they cannot creep up.

Usage: python benchmarks/launches.py [--family NAME ...] [--tree-budget N ...] [--ops] [--json FILE]
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
from tests.launch_count import BUDGETS, FAMILIES, RELEASED, count_family, real_width_extra, tree_step  # noqa: E402

LINEAR_MODES = ("cublas", "invariant")


def released_layers(family: str) -> dict[str, int]:
    from dflash_cli.synthetic import TARGETS

    n = TARGETS[RELEASED[family]]["num_hidden_layers"]
    full = n // 4  # Qwen3.5: every 4th layer is gated full attention, the rest linear attention
    return {"dense": {"dense": n}, "moe": {"moe": n}, "hybrid": {"linear": n - full, "full": full},
            "hybrid-moe": {"linear+moe": n - full, "full+moe": full},
            "gpt-oss": {"gpt-oss sliding": n // 2, "gpt-oss full": n - n // 2}}[family]


def released_table(results: dict[str, list]) -> tuple[str, list[str]]:
    """The estimate per family and mode, and one line per released layer kind naming its projections at
    the real widths (splits, launches with the merge folded in / with a merge launch)."""
    head = ["family", "released target", "layers", *[f"decode launches, {m} (est.)" for m in results],
            "at the issue's budgets"]
    rows, notes = [head, ["---"] * len(head)], []
    families = [c.family for c in next(iter(results.values()))]
    for family in families:
        if family not in RELEASED:
            continue
        layers = released_layers(family)
        extra = {}
        for kind in layers:
            extra[kind], projections = real_width_extra(family, kind)
            before = sum(p.launches["launch"] - 1 for p in projections)
            notes.append(f"{RELEASED[family]} {kind}: " + ", ".join(
                f"{p.name} {p.n}x{p.k} {p.splits} slice{'s' if p.splits > 1 else ''}" for p in projections)
                + f"; invariant launches beyond the tiny count: +{extra[kind]} (with a merge launch per split weight, "
                f"the two-launch form: +{before})")
        cells = []
        for mode, counts in results.items():
            c = next(c for c in counts if c.family == family)
            if "decode" not in c.per_layer:
                cells.append("")
                continue
            plus = extra if mode == "invariant" else dict.fromkeys(layers, 0)
            per_layer = {k: c.per_layer["decode"][k] + plus[k] for k in layers}
            cells.append(str(c.fixed["decode"] + sum(n * per_layer[k] for k, n in layers.items())))
        budget = BUDGETS["fixed"] + sum(n * BUDGETS[k] for k, n in layers.items())
        rows.append([family, RELEASED[family], " + ".join(f"{n} {k}" for k, n in layers.items()), *cells, str(budget)])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows), notes


def table(results: dict[str, list]) -> str:
    flat = [c for counts in results.values() for c in counts]
    kinds = list(dict.fromkeys(k for c in flat for step in c.per_layer.values() for k in step))
    head = ["family", "linear", "step", *[f"{k} (≤{BUDGETS[k]})" for k in kinds], f"fixed (≤{BUDGETS['fixed']})",
            "total (tiny)"]
    rows = [head, ["---"] * len(head)]
    for c in flat:
        for step in c.per_layer:
            cells = [str(c.per_layer[step][k]) if k in c.per_layer[step] else "" for k in kinds]
            rows.append([c.family, c.linear, step, *cells, str(c.fixed[step]), str(c.total[step])])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these (default: all)")
    ap.add_argument("--linear", action="append", choices=LINEAR_MODES,
                    help="DFLASH_LINEAR modes to count (default: both)")
    ap.add_argument("--ops", action="store_true", help="also print each kind's launches by op")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    ap.add_argument("--tree-budget", type=int, action="append",
                    help="also count a tree iteration of this many nodes, at b = 4 (default: 8 and 16; 0: none), "
                         "for the families that verify trees")
    args = ap.parse_args()
    trees = [n for n in args.tree_budget or (8, 16) if n]
    if any(n < 2 for n in trees):
        ap.error("--tree-budget: a tree has at least 2 nodes (0: count no tree step)")
    results, start = {}, time.perf_counter()
    for mode in args.linear or LINEAR_MODES:
        results[mode] = []
        for name in args.family or FAMILIES:
            family = FAMILIES[name]
            steps = ("decode", "verify", *(tree_step(n) for n in trees if family.trees))
            results[mode].append(count_family(family, steps, linear=mode))
            print(f"counted {name}, DFLASH_LINEAR={mode} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print("Launches per layer (by kind) and per step's fixed work, at the tiny models' widths; the issue's budget")
    print("beside each kind.")
    print(table(results))
    print()
    print("A released target's decode step, estimated at its real widths: fixed + its layers × launches per layer,")
    print("each layer's count the tiny model's plus what its projections launch beyond it at the real N × K")
    print("(the invariant launcher run on meta tensors at each weight's shape, launches counted, not run).")
    released, notes = released_table(results)
    print(released)
    for line in notes:
        print(f"- {line}")
    if args.ops:
        for c in (c for counts in results.values() for c in counts):
            for step in c.ops:
                for kind, ops in c.ops[step].items():
                    print(f"{c.family} {c.linear} {step} {kind}: " + ", ".join(f"{op} {n}" for op, n in ops.items()))
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for counts in results.values() for c in counts], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
