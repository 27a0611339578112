"""Start-up time of the CLI: the wall time of `dflash models` and the time to the first answer byte
of `dflash run demo`, each the median of --runs fresh processes (with the minimum and maximum).

  OMP_NUM_THREADS=1 python benchmarks/startup.py --runs 9

It runs `python -m dflash_cli` from the checkout this file is in, so two checkouts compare.
Run it on a quiet machine if you can: on a shared one the spread is the figure to read.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="100")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def models_seconds() -> float:
    """Wall time of `dflash models`, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dflash_cli", "models"], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def first_token_seconds(tokens: int) -> float:
    """From the start of `dflash run demo` to the first byte of its answer on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dflash_cli", "run", "demo", "-p", "Once upon a time",
                             "-n", str(tokens), "-q"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"dflash run demo failed (exit {proc.returncode})")
    return seconds


def line(name: str, samples: list[float]) -> str:
    return (f"{name:<30} median {statistics.median(samples):6.2f} s   "
            f"min {min(samples):6.2f} s   max {max(samples):6.2f} s   ({len(samples)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="fresh processes per measurement (default 9)")
    parser.add_argument("--tokens", type=int, default=16, help="answer length of `run demo` (default 16)")
    args = parser.parse_args()
    models, first = [], []
    for _ in range(args.runs):  # interleaved, so that a burst of load elsewhere hits both alike
        models.append(models_seconds())
        first.append(first_token_seconds(args.tokens))
    print(f"checkout {ROOT}")
    print(line("dflash models (wall)", models))
    print(line("dflash run demo (first token)", first))


if __name__ == "__main__":
    main()
