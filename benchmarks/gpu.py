"""The GPU timing of one synthetic shape (random weights at a released model's real shapes, no
download): `dflash bench --synthetic`'s report, with phase lines as it goes, and for qwen3-8b the
acceptance table of the fast path (issue: CUDA graphs and `dflash bench`).

Per-step times, the decode step against the copy-bandwidth roofline, the iteration at every block
size auto may choose and its break-even τ, and the tok/s projected at --tau. For qwen3-8b each figure
is checked against its target in a table printed last. `[  t s] phase ...` lines come while it runs
(weights built, each graph captured, each phase timed), so a run cut short by its time limit still
says how far it got: run_synthetic prints nothing until it returns, so this script wraps the
functions it calls (dflash_cli.synthetic's random_pair, graphed, time_it, device_time,
copy_bandwidth and Engine.measure) with a line each; the measurement itself is unchanged.

    python benchmarks/gpu.py [--shape qwen3-8b] [--tau 6.4] [--json FILE] [--device cuda|cpu] [--table]

--json merges this shape's report into FILE, keyed by shape (several runs share one file).
--device cpu rehearses it (use a tiny shape: tiny, tiny-hybrid, tiny-moe, tiny-gpt-oss, tiny-dflash2).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

TARGETS = {"qwen3-8b"}  # the shapes the acceptance table's targets were set for


def phase_lines(started: float) -> None:
    """Wrap what run_synthetic calls so that each step prints a line when it ends."""
    from dflash_cli import engine, synthetic

    def wrap(owner, name: str, describe):
        real = getattr(owner, name, None)
        if real is None:  # renamed in the package: no line for it, the run goes on
            return

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = real(*args, **kwargs)
            print(f"[{time.perf_counter() - started:6.1f} s] {describe(result)} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
            return result

        setattr(owner, name, wrapper)

    wrap(synthetic, "random_pair", lambda r: "random weights built")
    wrap(synthetic, "graphed", lambda r: "phase graph captured")
    wrap(synthetic, "time_it", lambda s: f"timed (whole iterations): {s * 1e3:.3f} ms")
    wrap(synthetic, "device_time", lambda s: f"timed (device): {s * 1e3:.3f} ms")
    wrap(synthetic, "copy_bandwidth", lambda r: f"copy rate {r / 1e9:.0f} GB/s")
    wrap(engine.Engine, "measure", lambda r: "block sizes measured: "
         + " · ".join(f"b {b} {s * 1e3:.3f} ms" for b, s in (r or {}).items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--tau", type=float, default=6.4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--table", action="store_true", help="the acceptance table for any shape (default: qwen3-8b's)")
    args = parser.parse_args()
    from dflash_cli import cuda, loader

    if args.device != "cpu" and not cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; nothing measured (--device cpu rehearses)", file=sys.stderr)
        return 0
    from rich.console import Console

    from dflash_cli.bench import render_synthetic
    from dflash_cli.synthetic import run_synthetic

    device = loader.resolve_device(args.device)  # a GPU with its index: set_device refuses one without
    dtype = torch.bfloat16 if cuda.is_gpu(device) else torch.float32
    card = cuda.device_name(device) if cuda.is_gpu(device) else "CPU (rehearsal)"
    print(f"{args.shape} · {card} · torch {torch.__version__} · triton {__import__('triton').__version__} · "
          f"{str(dtype).removeprefix('torch.')} · context {args.context}", flush=True)
    started = time.perf_counter()
    phase_lines(started)
    r = run_synthetic(args.shape, device=device, dtype=dtype, context=args.context, tau=args.tau, iters=50)
    print(f"[{time.perf_counter() - started:6.1f} s] done", flush=True)
    if args.json:
        merged = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                merged = json.load(f)
        merged[args.shape] = r.to_json() | {"card": card}
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)
    render_synthetic(r, Console(width=200, highlight=False))  # the lines `dflash bench --synthetic` prints
    if args.shape not in TARGETS and not args.table:
        return 0
    rows = [
        ("decode step vs copy roofline", f"{100 * r.roofline_fraction:.1f}%", ">= 85%", r.roofline_fraction >= 0.85),
        (f"verify({r.block_size}) / decode", f"{r.verify_s / r.decode_s:.3f}", "<= 1.15", r.verify_s / r.decode_s <= 1.15),
        ("draft / decode", f"{r.draft_s / r.decode_s:.3f}", "<= 0.25", r.draft_s / r.decode_s <= 0.25),
        ("host overhead / iteration", f"{100 * r.host_overhead_s / r.iteration_s:.1f}%", "< 5%",
         r.host_overhead_s / r.iteration_s < 0.05),
        (f"projected tok/s at tau {args.tau}", f"{r.projected_tps:.0f}", "> 1200", r.projected_tps > 1200),
    ]
    print()
    print(f"GPU: {card} · {args.shape} {str(dtype).removeprefix('torch.')} · context {args.context}")
    for name, value in (("decode", r.decode_s), (f"verify({r.block_size})", r.verify_s), ("draft", r.draft_s),
                        ("accept", r.accept_s), ("iteration", r.iteration_s)):
        print(f"  {name:<12} {value * 1e3:8.3f} ms")
    print(f"  weights {r.weight_bytes / 1e9:.2f} GB · decode {r.decode_bandwidth / 1e9:.0f} GB/s · "
          f"copy {r.copy_bytes_per_s / 1e9:.0f} GB/s · plain {1 / r.decode_s:.1f} tok/s")
    print(f"| {'check':<32} | {'measured':>10} | {'target':>8} | ok  |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 10}|-----|")
    for name, value, target, ok in rows:
        print(f"| {name:<32} | {value:>10} | {target:>8} | {'yes' if ok else 'NO ':<3} |")
    print("(projected tok/s = tau / measured iteration time: a projection, not a generation run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
