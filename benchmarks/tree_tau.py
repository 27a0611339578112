"""Tree verification (DDTree) against the chain: mean τ (tokens committed per target pass) and CPU decode speed
at tree budgets 0 (the chain), 8, 16, 32 and 64, and what `--tree-budget auto` picks from this machine's
measured costs (its budget mix, τ and speed), greedy and sampled; each answer checked equal to plain
decoding's (greedy: the chain's tokens; sampled: the same seed's).

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/tree_tau.py [--tokens 128]         # the demo pair's stories
  ... tree_tau.py --pair dense|moe|gpt-oss|hybrid|all   # the tests' tiny targets with drafters fitted to them
                                                        # (tests/conftest.py: fitted once, then cached)
  ... tree_tau.py --target T --drafter D   # another pair, on the tests' fitting prompts (HYBRID_PROMPTS)

The fitted pairs run on the prompts their drafters were fitted to (tests/conftest.py HYBRID_PROMPTS): what
the drafter learnt, as the tests use them. A pair whose target has no tree verify yet (the hybrid, until it
lands) gets its chain row and says so. Prints the table docs/benchmarks.md records.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from dflash_cli import loader, registry
from dflash_cli.bench import builtin_prompts
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.sampling import SamplingParams

BUDGETS = (0, 8, 16, 32, 64)
PAIRS = ("dense", "moe", "gpt-oss", "hybrid")
SAMPLINGS = (("greedy", SamplingParams()), ("T = 1, seed 0", SamplingParams(temperature=1.0, seed=0)))


def fitted_pair(name: str, root: Path) -> tuple[Path, Path]:
    """The tests' tiny target of this family and its drafter fitted to HYBRID_PROMPTS (as tests/conftest.py
    builds them; the fitted drafters are cached in tests/.cache, so a second run copies them)."""
    from tests import conftest as c

    if name == "dense":  # a tiny Qwen3 (no fixture fits one: the tests' dense pair is the demo's trained drafter)
        cfg = c.target_config("qwen3", tie=False)
        t = c.write_target(root / "qwen3", cfg, seed=7)
        dcfg = c.drafter_config(cfg, block_size=8, layers=1, target_layer_ids=(0, 2), mask_token_id=500)
        return t, c.fitted("qwen3-dense", t, root / "qwen3-drafter", dcfg, c.HYBRID_PROMPTS, steps=500)
    if name == "moe":
        cfg = c.qwen3_moe_config()
        t = c.write_target(root / "qwen3-moe", cfg, seed=13)
        dcfg = c.drafter_config(cfg, block_size=8, layers=1, target_layer_ids=(0, 2), mask_token_id=500)
        return t, c.fitted("qwen3-moe", t, root / "qwen3-moe-drafter", dcfg, c.HYBRID_PROMPTS, steps=500)
    if name == "gpt-oss":
        from tests.tiny_gpt_oss import gpt_oss_config, gpt_oss_drafter_config, write_gpt_oss

        cfg = gpt_oss_config()
        t = write_gpt_oss(root / "gpt-oss", cfg, seed=19)
        dcfg = gpt_oss_drafter_config(cfg, block_size=8, layers=2, target_layer_ids=(1, 3))
        return t, c.fitted("gpt-oss", t, root / "gpt-oss-drafter", dcfg, c.HYBRID_PROMPTS, steps=500)
    if name == "hybrid":
        cfg = c.qwen35_config()
        t = c.write_qwen35(root / "qwen35", cfg, seed=11, slow_decay=True)
        dcfg = c.drafter_config(cfg["text_config"], block_size=8, layers=2, target_layer_ids=(1, 3), heads=4,
                                kv_heads=2, head_dim=16, intermediate=128, mask_token_id=500,
                                layer_types=["sliding_attention", "full_attention"], sliding_window=16)
        return t, c.fitted("qwen35", t, root / "qwen35-drafter", dcfg, c.HYBRID_PROMPTS, steps=600)
    raise SystemExit(f"unknown pair '{name}' (choose from demo, {', '.join(PAIRS)}, all)")


def answer(engine: Engine, ids: list[int], tokens: int, sampling: SamplingParams,
           stops) -> tuple[list[int], list[int], list[int], float, float]:
    """(token ids, τ per iteration, tree budget per iteration, decode seconds, decode CPU seconds). The CPU
    seconds are this thread's (torch runs on one): on a shared machine wall time also counts the
    neighbours' time slices, which the CPU time leaves out."""
    out, taus, budgets, seconds, cpu = [], [], [], 0.0, 0.0
    steps = engine.generate(Request(ids, tokens, stops, sampling))
    clock = time.thread_time()
    for step in steps:
        if not step.prefill:
            cpu += time.thread_time() - clock
            taus.append(step.acceptance_length)
            budgets.append(step.tree_budget)
            seconds += step.seconds
        out += step.tokens
        clock = time.thread_time()
    return out, taus, budgets, seconds, cpu


def mix(budgets: Counter) -> str:
    """'chain 80% · 16: 20%': the budgets auto verified, as shares of its iterations."""
    total = sum(budgets.values())
    return " · ".join(f"{'chain' if n == 0 else n}: {100 * k / total:.0f}%" for n, k in sorted(budgets.items()))


def table(label: str, model, prompts: list[list[int]], stops, tokens: int) -> None:
    b = model.drafter.cfg.block_size
    for name, sampling in SAMPLINGS:
        plain = Engine(model.target)
        want = [answer(plain, ids, tokens, sampling, stops)[0] for ids in prompts]
        for budget in (*BUDGETS, "auto"):
            try:
                engine = Engine(model.target, model.drafter, block_size=b, tree_budget=budget)
            except DflashError as e:
                print(f"| {label} | {name} | {budget} | not supported ({str(e).split(';')[0]}) | | | | |")
                continue
            answer(engine, prompts[0], 8, sampling, stops)  # first calls pay one-time costs (and auto measures)
            generated = iterations = 0
            seconds, cpu, equal, used = 0.0, 0.0, True, Counter()
            for ids, reference in zip(prompts, want):
                got, taus, budgets, secs, cpu_secs = answer(engine, ids, tokens, sampling, stops)
                equal &= got == reference
                generated, iterations, seconds = generated + sum(taus), iterations + len(taus), seconds + secs
                cpu += cpu_secs
                used.update(budgets)
            shown = "0 (chain)" if budget == 0 else str(budget)
            chose = mix(used) if budget == "auto" else ""
            print(f"| {label} | {name} | {shown} | {generated / iterations:.2f} | {generated / seconds:.0f} | "
                  f"{generated / cpu:.0f} | {'yes' if equal else 'NO'} | {chose} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pair", default="demo", help=f"demo, {', '.join(PAIRS)} or all (or several, comma-separated)")
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.tokens} tokens per prompt, block size 8 (the drafters'), CPU fp32, one thread; decode tok/s: "
          "wall-clock, and over this thread's CPU time")
    print("| pair | sampling | tree budget | mean τ | decode tok/s (wall) | decode tok/s (CPU time) | answers equal "
          "| auto chose |")
    print("|---|---|---|---|---|---|---|---|")
    if args.target:
        from tests.conftest import HYBRID_PROMPTS

        model = loader.load(args.target, args.drafter, device="cpu", dtype="float32")
        table(Path(args.target).name, model, HYBRID_PROMPTS, frozenset(), args.tokens)
        return
    names = ["demo", *PAIRS] if args.pair == "all" else [n.strip() for n in args.pair.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "demo":
                model = loader.load(*registry.demo_dirs(), device="cpu", dtype="float32")
                prompts = [model.tokenizer.encode(p["prompt"]) for p in builtin_prompts(("story",))]
                table("demo (stories)", model, prompts, model.stop_token_ids, args.tokens)
                continue
            from tests.conftest import HYBRID_PROMPTS

            model = loader.load(*fitted_pair(name, Path(tmp)), device="cpu", dtype="float32")
            table(f"{name} (fitted)", model, HYBRID_PROMPTS, frozenset(), args.tokens)


if __name__ == "__main__":
    main()
