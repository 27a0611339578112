"""The GPU acceptance table for the fast path (issue: CUDA graphs and `dflash bench`).

Synthetic Qwen3-8B shapes in bf16 (no download): per-step times, the decode step against the
copy-bandwidth roofline, and the tok/s projected at τ = 6.4, each checked against its target.
Prints the table last. Usage: python benchmarks/gpu.py [--shape qwen3-8b] [--tau 6.4] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dflash_cli.synthetic import run_synthetic


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--tau", type=float, default=6.4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    r = run_synthetic(args.shape, device=torch.device("cuda"), dtype=torch.bfloat16, context=args.context,
                      tau=args.tau, iters=50)
    rows = [
        ("decode step vs copy roofline", f"{100 * r.roofline_fraction:.1f}%", ">= 85%", r.roofline_fraction >= 0.85),
        (f"verify({r.block_size}) / decode", f"{r.verify_s / r.decode_s:.3f}", "<= 1.15", r.verify_s / r.decode_s <= 1.15),
        ("draft / decode", f"{r.draft_s / r.decode_s:.3f}", "<= 0.25", r.draft_s / r.decode_s <= 0.25),
        ("host overhead / iteration", f"{100 * r.host_overhead_s / r.iteration_s:.1f}%", "< 5%",
         r.host_overhead_s / r.iteration_s < 0.05),
        (f"projected tok/s at tau {args.tau}", f"{r.projected_tps:.0f}", "> 1200", r.projected_tps > 1200),
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r.to_json(), f, indent=1)
    print(f"GPU: {torch.cuda.get_device_name(0)} · torch {torch.__version__} · "
          f"triton {__import__('triton').__version__} · {args.shape} bf16 · context {args.context}")
    for name, value in (("decode", r.decode_s), (f"verify({r.block_size})", r.verify_s), ("draft", r.draft_s),
                        ("accept", r.accept_s), ("iteration", r.iteration_s)):
        print(f"  {name:<12} {value * 1e3:8.3f} ms")
    print(f"  weights {r.weight_bytes / 1e9:.2f} GB · decode {r.decode_bandwidth / 1e9:.0f} GB/s · "
          f"copy {r.copy_bytes_per_s / 1e9:.0f} GB/s · plain {1 / r.decode_s:.1f} tok/s")
    print()
    print(f"| {'check':<32} | {'measured':>10} | {'target':>8} | ok  |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 10}|-----|")
    for name, value, target, ok in rows:
        print(f"| {name:<32} | {value:>10} | {target:>8} | {'yes' if ok else 'NO ':<3} |")
    print("(projected tok/s = tau / measured iteration time: a projection, not a generation run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
