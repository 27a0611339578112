"""The demo pair on a CPU: the shipped drafter's τ on held-out story prompts, `dflash bench demo`'s
speed-up over plain decoding, and (with --train) `dflash train` from scratch within a time budget.

  python benchmarks/demo.py                 # τ and bench of the shipped drafter (about a minute)
  python benchmarks/demo.py --train 8m      # also: prompts, answers and training from scratch

Run it with OMP_NUM_THREADS=1 on a shared machine. Prints the figures docs/benchmarks.md records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dflash_cli import loader, registry
from dflash_cli.bench import builtin_prompts
from dflash_cli.train.evaluate import measure

ROOT = Path(__file__).resolve().parents[1]


def shipped_tau(tokens: int) -> None:
    model = loader.load(*registry.demo_dirs(), device="cpu")
    held = [model.tokenizer.encode(p["prompt"]) for p in builtin_prompts(("story",))]
    acc = measure(model.target, model.drafter, held, block_size=8, max_new_tokens=tokens,
                  stop_token_ids=model.stop_token_ids)
    per = " ".join(f"{acc.accepted_at(k):.2f}" for k in range(1, 8))
    print(f"shipped drafter: held-out τ {acc.tau:.2f} at T=0, block 8 ({acc.prompts} story prompts, "
          f"{acc.tokens} tokens, {acc.iterations} iterations); accepted at positions 1..7: {per}")


def bench(tokens: int) -> None:
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "bench", "demo", "--device", "cpu", "-n", str(tokens),
                        "--json"], capture_output=True, text=True, check=True)
    t = json.loads(p.stdout)["totals"]
    print(f"dflash bench demo -n {tokens}: plain {t['plain_tps']:.0f} tok/s, DFlash {t['dflash_tps']:.0f} tok/s, "
          f"speed-up {t['speedup']:.2f}x, τ {t['tau']:.2f}, identical answers: {t['all_identical']}")


def train(budget: str, prompts: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_pair.py"), "--work", work,
                            "--time", budget, "--prompts", str(prompts)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if p.returncode != 0:
            sys.exit(f"make_demo_pair failed:\n{p.stderr[-2000:]}")
        state = json.loads((Path(work) / "stories260K-dflash" / "train-state" / "state.json").read_text())
        answers = len((Path(work) / "stories260K-dflash" / "train-state" / "answers.jsonl").read_text().splitlines())
        print(f"dflash train from scratch: {wall / 60:.1f} min wall in all ({prompts} sampled openings, {answers} "
              f"answers, then {state['elapsed'] / 60:.1f} min of training, {state['step']} steps); "
              f"held-out τ by checkpoint: {[e['tau'] for e in state['evaluations']]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", metavar="BUDGET", help="also train from scratch for this long (e.g. 8m)")
    ap.add_argument("--prompts", type=int, default=400, help="with --train: sampled story openings")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per held-out prompt")
    args = ap.parse_args()
    print(f"torch threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", file=sys.stderr)
    shipped_tau(args.tokens)
    bench(args.tokens)
    if args.train:
        train(args.train, args.prompts)


if __name__ == "__main__":
    main()
