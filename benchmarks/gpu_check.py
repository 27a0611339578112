"""Correctness of the GPU fast path, before any timing: the same tokens every way the engine can run.

Random weights (no download). For each case, greedy tokens of one prompt, compared with the first
row of the case (the reference) and printed as `same` or the first index that differs:
  tiny, tiny-hybrid (Qwen3.5 layout), tiny-moe (Qwen3-MoE layout), tiny-gpt-oss, tiny-dflash2, float32:
      torch references (eager) · Triton kernels (eager) · kernels + CUDA graphs, with and without
      lookahead (iteration i+1 queued before i is read), speculative and plain. In float32 every row
      must agree: this is the lossless claim on a GPU.
  tiny-hybrid also prefills a 200-token prompt in one chunk, which takes fla's chunked kernel
      (chunks over 64 tokens; its dots run in TF32 on fp32 inputs), and compares the logits of every
      position and the recurrent states with the torch reference within a tolerance: a prefill is
      shared by every arm, so it only has to be close, and the tokens after it are not compared.
  qwen3-8b shapes, bf16: kernels eager · kernels + CUDA graphs + lookahead (must be identical: a
      replay runs the same kernels on the same data), and plain decoding beside them (bf16 verify
      and decode round differently, so near-ties may part; reported, not required).
Each case and each row runs on its own: an exception is printed (`ERROR ExcType: message`, the
traceback to stderr) and the next row runs. One verdict line per case (`gpu_check CASE: ok` or
`FAILED`), then `gpu_check: ok` or `FAILED`; exits 1 if a required row failed or raised.
Usage: python benchmarks/gpu_check.py [--only tiny,tiny-hybrid] [--device cuda]
Without --only every case but tiny-dflash2 runs. Rehearsal on a CPU (the kernels in Triton's
interpreter, which this script turns on for --device cpu; minutes a row):
  python benchmarks/gpu_check.py --device cpu --only tiny --rows 2 --fail tiny:1
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

# (kernels, graphs, speculative, lookahead) for every path a float32 case takes; the first is the reference.
EVERY_PATH = [("torch", False, True, False), ("torch", False, False, False), ("triton", False, True, False),
              ("triton", False, False, False), ("triton", True, True, False), ("triton", True, True, True),
              ("triton", True, False, True)]
# name: (shape, dtype, tokens generated, rows, rows that must match the reference: None for all)
CASES = {
    "tiny": ("tiny", torch.float32, 64, EVERY_PATH, None),
    "tiny-hybrid": ("tiny-hybrid", torch.float32, 48, EVERY_PATH, None),  # masked-replay commit, fla kernels
    "tiny-moe": ("tiny-moe", torch.float32, 48, EVERY_PATH, None),  # the fused expert kernel
    "tiny-gpt-oss": ("tiny-gpt-oss", torch.float32, 48, EVERY_PATH, None),  # sinks, windows, MXFP4 experts
    "tiny-dflash2": ("tiny-dflash2", torch.float32, 48, EVERY_PATH, None),  # the selector's walk, captured
    "qwen3-8b": ("qwen3-8b", torch.bfloat16, 48, [("triton", False, True, False), ("triton", True, True, True),
                                                 ("triton", True, False, True)], 2),
}
ONLY_WHEN_ASKED = {"tiny-dflash2"}  # benchmarks/gpu.sh asks for every case by name
PROMPT_TOKENS = 48  # within one fused-recurrent chunk (<= 64): the token rows are exact
PREFILL_TOKENS = 200  # over 64: fla's chunked kernel (kernels/gated_delta.py)
PREFILL_TOLERANCE = 2e-2  # of the reference's largest |value|: TF32 inputs alone move the states ~5e-4 of theirs


def tokens(device: torch.device, shape: str, dtype: torch.dtype, kernels: str, graphs: bool, speculative: bool,
           lookahead: bool, n: int) -> list[int]:
    from dflash_cli.engine import Engine, Request
    from dflash_cli.synthetic import SHAPES, random_pair

    os.environ["DFLASH_KERNELS"], os.environ["DFLASH_CUDA_GRAPHS"] = kernels, "1" if graphs else "0"
    torch.manual_seed(0)  # the same random weights for every row
    target, drafter = random_pair(shape, dtype, device, 2048)
    engine = Engine(target, drafter if speculative else None, max_context=1024, lookahead=lookahead)
    prompt = torch.randint(0, SHAPES[shape][0]["vocab_size"], (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    return [t for step in engine.generate(Request(prompt, n)) for t in step.tokens]


def prefill(device: torch.device, shape: str, dtype: torch.dtype, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every position, the linear layers' states) after one PREFILL_TOKENS-token chunk."""
    from dflash_cli.synthetic import SHAPES, random_pair

    os.environ["DFLASH_KERNELS"], os.environ["DFLASH_CUDA_GRAPHS"] = kernels, "0"
    torch.manual_seed(0)
    target, _ = random_pair(shape, dtype, device, 2048)
    cache = target.new_cache(1024, 1)
    ids = torch.randint(0, SHAPES[shape][0]["vocab_size"], (PREFILL_TOKENS,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits, _ = target.forward(ids.to(device), cache, logits_from=0, commit=True)
    return logits.float().cpu(), cache.state.float().cpu()


def first_difference(a: list[int], b: list[int]) -> str:
    return "same" if a == b else f"differs at {next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}"


def close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, str]:
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    ok = bool(torch.isfinite(got).all()) and err <= PREFILL_TOLERANCE * scale
    return ok, f"max |Δ| {err:.2e} of {scale:.2e}"


def error_line(e: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"ERROR {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


class Injected(RuntimeError):
    """The failure --fail plants (rehearses the isolation)."""


def free(device: torch.device) -> None:
    """Give a row's model back before the next row builds its own (16 GB a row at Qwen3-8B shapes):
    an engine and its graphs may hold each other, so a collection first, then the allocator's cache."""
    from dflash_cli import cuda

    gc.collect()
    if cuda.is_gpu(device):
        torch.cuda.empty_cache()


def run_case(name: str, device: torch.device, rows_limit: int | None, fail_at: int | None) -> bool:
    """Prints one line per row and the case's verdict; True when every required row matched."""
    from dflash_cli import cuda

    shape, dtype, n, rows, required = CASES[name]
    rows = rows[:rows_limit] if rows_limit else rows
    dt = str(dtype).removeprefix("torch.")
    case_start, failures, reference = time.perf_counter(), [], None
    for i, (kernels, graphs, speculative, lookahead) in enumerate(rows):
        must = required is None or i < required
        start = time.perf_counter()
        label = (f"{name:<12} {dt:<8} kernels={kernels:<6} graphs={str(graphs):<5} "
                 f"{'DFlash' if speculative else 'plain ':<6} lookahead={str(lookahead):<5}")
        try:
            if fail_at == i:
                raise Injected(f"planted by --fail {name}:{i} (rehearsal of a failing row)")
            got = tokens(device, shape, dtype, kernels, graphs, speculative, lookahead, n)
            if i == 0:
                reference = got
            verdict = first_difference(reference, got) if reference is not None else "no reference (row 0 failed)"
            status = f"{len(got):3d} tokens  {verdict:<16}"
            if must and verdict != "same":
                failures.append(f"row {i} {verdict}")
        except Exception as e:  # the next row still runs (a CUDA error may spoil them: they say so too)
            status = error_line(e)
            failures.append(f"row {i} {type(e).__name__}")
        print(f"{label} {status} {'' if must else '(informational) '}{time.perf_counter() - start:5.1f} s", flush=True)
        free(device)
    if name == "tiny-hybrid":
        start = time.perf_counter()
        # On a CPU fla's chunked kernel cannot run (its autotuner needs a GPU driver): the rehearsal
        # compares the reference with itself, which still runs this row's code.
        kernels = "triton" if cuda.is_gpu(device) else "torch"
        label = (f"{name:<12} {dt:<8} prefill {PREFILL_TOKENS} tokens, one chunk "
                 f"{'(fla chunked, TF32)' if kernels == 'triton' else '(CPU rehearsal: torch)'} vs torch:")
        try:
            want_logits, want_state = prefill(device, shape, dtype, "torch")
            got_logits, got_state = prefill(device, shape, dtype, kernels)
            ok_l, msg_l = close(got_logits, want_logits)
            ok_s, msg_s = close(got_state, want_state)
            status = (f"logits {msg_l} · states {msg_s} · tolerance {PREFILL_TOLERANCE:g} of the largest: "
                      f"{'ok' if ok_l and ok_s else 'FAILED'}")
            if not (ok_l and ok_s):
                failures.append("prefill outside the tolerance")
        except Exception as e:
            status = error_line(e)
            failures.append(f"prefill {type(e).__name__}")
        print(f"{label} {status} {time.perf_counter() - start:5.1f} s", flush=True)
        free(device)
    seconds = time.perf_counter() - case_start
    print(f"gpu_check {name}: {'FAILED (' + '; '.join(failures) + ')' if failures else 'ok'} "
          f"({len(rows)} rows, {seconds:.0f} s)", flush=True)
    return not failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default=None,
                        help=f"cases, comma-separated: {', '.join(CASES)} (default: all but {', '.join(ONLY_WHEN_ASKED)})")
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows of each case (a rehearsal's shortcut)")
    parser.add_argument("--fail", default=None, metavar="CASE:ROW",
                        help="raise in that row (rehearses the isolation: the other rows and cases still run)")
    args = parser.parse_args()
    wanted = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else \
        [c for c in CASES if c not in ONLY_WHEN_ASKED]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
    fail_case, _, fail_row = (args.fail or "").partition(":")
    if args.device == "cpu":  # the kernels can only run in Triton's interpreter here; set before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dflash_cli import cuda, loader

    if args.device != "cpu" and not cuda.is_available():
        print("gpu_check: nothing checked (no CUDA GPU; --device cpu rehearses)")
        return 0
    device = loader.resolve_device(args.device)  # a GPU with its index
    failed = []
    for name in wanted:
        try:
            ok = run_case(name, device, args.rows, int(fail_row or 0) if fail_case == name else None)
        except Exception as e:  # outside any row: the case's own setup
            print(f"gpu_check {name}: FAILED ({error_line(e)})", flush=True)
            ok = False
        if not ok:
            failed.append(name)
    print("gpu_check:", f"FAILED ({', '.join(failed)})" if failed else "ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
