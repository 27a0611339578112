"""Correctness of the GPU fast path, before any timing: the same tokens every way the engine can run.

Random weights (no download). For each case, greedy tokens of one prompt, compared with the first
row of the case (the reference) and printed as `same` or the first index that differs:
  tiny, tiny-hybrid (Qwen3.5 layout), tiny-moe (Qwen3-MoE layout), tiny-gpt-oss, float32: torch references (eager)
      · Triton kernels (eager) · kernels + CUDA graphs, with and without lookahead (iteration i+1 queued
      before i is read), speculative and plain. In float32 every row must agree: this is the lossless
      claim on a GPU.
  qwen3-8b shapes, bf16: kernels eager · kernels + CUDA graphs + lookahead (must be identical: a
      replay runs the same kernels on the same data), and plain decoding beside them (bf16 verify
      and decode round differently, so near-ties may part; reported, not required).
Exits 1 if a required agreement fails. Usage: python benchmarks/gpu_check.py [--only tiny]
(`TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --only tiny` rehearses it on a CPU.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dflash_cli.engine import Engine, Request
from dflash_cli.synthetic import SHAPES, random_pair


def tokens(device: torch.device, shape: str, dtype: torch.dtype, kernels: str, graphs: bool, speculative: bool,
           lookahead: bool, n: int) -> list[int]:
    os.environ["DFLASH_KERNELS"], os.environ["DFLASH_CUDA_GRAPHS"] = kernels, "1" if graphs else "0"
    torch.manual_seed(0)  # the same random weights for every row
    target, drafter = random_pair(shape, dtype, device, 2048)
    engine = Engine(target, drafter if speculative else None, max_context=1024, lookahead=lookahead)
    prompt = torch.randint(0, SHAPES[shape][0]["vocab_size"], (48,), generator=torch.Generator().manual_seed(1)).tolist()
    out = [t for step in engine.generate(Request(prompt, n)) for t in step.tokens]
    del engine, target, drafter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def first_difference(a: list[int], b: list[int]) -> str:
    return "same" if a == b else f"differs at {next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}"


ONLY_WHEN_ASKED = {"tiny-dflash2"}  # benchmarks/gpu_more.sh runs it; gpu.sh's time is spent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default=None, help="one shape: tiny, tiny-hybrid, tiny-moe, tiny-gpt-oss, tiny-dflash2 or qwen3-8b")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_check.py needs a CUDA GPU; nothing checked", file=sys.stderr)
        return 0
    failed = False
    every_path = [("torch", False, True, False), ("torch", False, False, False), ("triton", False, True, False),
                  ("triton", False, False, False), ("triton", True, True, False), ("triton", True, True, True),
                  ("triton", True, False, True)]
    cases = [
        ("tiny", torch.float32, 64, every_path, None),
        ("tiny-hybrid", torch.float32, 48, every_path, None),  # Gated DeltaNet: masked-replay commit, fla kernels
        ("tiny-moe", torch.float32, 48, every_path, None),  # the fused expert kernel
        ("tiny-gpt-oss", torch.float32, 48, every_path, None),  # sinks, windows, MXFP4 experts in the kernel
        ("tiny-dflash2", torch.float32, 48, every_path, None),  # the selector's walk inside the captured step
        ("qwen3-8b", torch.bfloat16, 48, [("triton", False, True, False), ("triton", True, True, True),
                                          ("triton", True, False, True)], 2),
    ]
    for shape, dtype, n, rows, required in cases:
        if args.only != shape and (args.only is not None or shape in ONLY_WHEN_ASKED):
            continue
        reference = None
        for i, (kernels, graphs, speculative, lookahead) in enumerate(rows):
            start = time.perf_counter()
            got = tokens(device, shape, dtype, kernels, graphs, speculative, lookahead, n)
            reference = reference if reference is not None else got
            verdict = first_difference(reference, got)
            must = required is None or i < required
            failed |= must and verdict != "same"
            print(f"{shape:<9} {str(dtype).removeprefix('torch.'):<8} kernels={kernels:<6} graphs={str(graphs):<5} "
                  f"{'DFlash' if speculative else 'plain ':<6} lookahead={str(lookahead):<5} {len(got):3d} tokens  {verdict:<16} "
                  f"{'' if must else '(informational) '}{time.perf_counter() - start:5.1f} s", flush=True)
    print("gpu_check:", "FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
