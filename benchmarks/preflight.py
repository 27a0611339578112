"""Before any GPU minute is spent: what is installed, which card this is, and whether everything the
GPU scripts import imports. One line per check, then `preflight: ok` or `preflight: STOP (...)` with
exit 1: benchmarks/gpu.sh and gpu_more.sh then end the call at once, so that a missing wheel costs
seconds and a quick rerun with `carry: [".whl"]`, not a run of failing parts (research/gpu-review-2.md
F2, F10). DFLASH_GPU_FORCE=1 (in the device command) runs the parts anyway.

    python benchmarks/preflight.py [--device cpu]   (cpu: a rehearsal, no GPU needed)

Stops the call: torch sees no CUDA GPU; one Triton kernel does not compile or does not match its
reference (the toolchain); fla-core's gated delta rule (the hybrid), starlette or uvicorn (`dflash
serve`) or the dflash package (CLI, serve app, every kernel module) does not import: those come from
the carried wheels and this checkout, so the fix is quick. Reported only: transformers without its
qwen3_5, qwen3_5_moe or qwen3_next modelling module (the image's transformers is older; the tests
that compare with one then fail on their own, tests/conftest.py), and pytest-xdist or pytest-timeout
missing (the scripts then drop -n or --timeout; the part's own limit still holds).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
import traceback


def version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    rehearsal = args.device == "cpu"
    if rehearsal:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke kernel runs in the interpreter
    stops: list[str] = []

    print(f"python {platform.python_version()} ({sys.executable})")
    print(" · ".join(f"{d} {version(d)}" for d in ("triton", "transformers", "fla-core", "starlette", "uvicorn",
                                                   "huggingface-hub", "safetensors", "tokenizers", "anyio", "h11",
                                                   "click", "einops", "packaging", "pytest", "pytest-xdist",
                                                   "pytest-timeout", "scipy")))
    import torch

    print(f"torch {torch.__version__} built for CUDA {torch.version.cuda} · triton cache "
          f"{os.environ.get('TRITON_CACHE_DIR', '(default)')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        print(f"GPU: {p.name} · sm_{p.major}{p.minor} · {p.multi_processor_count} SMs · "
              f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB · {torch.cuda.device_count()} device(s)")
    elif rehearsal:
        print("GPU: none (rehearsal on the CPU: not required)")
    else:
        stops.append("torch sees no CUDA GPU")
        print("GPU: NONE: torch.cuda.is_available() is False")

    checks = [  # (what, modules, whether a failed import stops the call)
        ("fla-core (hybrid)", ["fla", "fla.ops.gated_delta_rule"], True),
        ("starlette, uvicorn (serve)", ["starlette", "uvicorn", "dflash_cli.serve.app"], True),
        ("dflash", ["dflash_cli.cli", "dflash_cli.synthetic", "dflash_cli.train.loop"]
         + [f"dflash_cli.kernels.{k}" for k in ("accept", "attention", "draft_kv", "gated_delta", "moe", "rmsnorm",
                                               "rope_cache", "swiglu")], True),
        ("transformers hybrid/MoE models (tests/conftest.py)",
         [f"transformers.models.{m}.modeling_{m}" for m in ("qwen3_5", "qwen3_5_moe", "qwen3_next")], False),
    ]
    for what, modules, stop in checks:
        start, failed = time.perf_counter(), []
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # ImportError, or a module that breaks on import
                failed.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        if failed and stop:
            stops.extend(failed)
        print(f"import {what}: {'ok' if not failed else 'MISSING ' + ' | '.join(failed)}"
              f"{' (reported only: the tests that compare with it fail on their own)' if failed and not stop else ''}"
              f" ({time.perf_counter() - start:.1f} s)")
    plugins = [p for p, mod in (("xdist", "xdist"), ("timeout", "pytest_timeout"))
               if importlib.util.find_spec(mod) is not None]
    print(f"pytest plugins: {', '.join(plugins) or 'none'} (the scripts use -n and --timeout only where present)")

    if torch.cuda.is_available() or rehearsal:  # one kernel compiled and run: Triton's toolchain works here
        start = time.perf_counter()
        try:
            from dflash_cli.kernels import rmsnorm

            dev = "cuda" if torch.cuda.is_available() and not rehearsal else "cpu"
            x, w = torch.randn(4, 256, device=dev), torch.randn(256, device=dev)
            torch.testing.assert_close(rmsnorm.rms_norm(x, w, 1e-6), rmsnorm.rms_norm_ref(x, w, 1e-6))
            how = "ran in the interpreter" if dev == "cpu" else "compiled"
            print(f"triton: rms_norm {how} and matches its reference on {dev} ({time.perf_counter() - start:.1f} s)")
        except Exception as e:
            traceback.print_exc()
            stops.append(f"triton smoke kernel: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            print(f"triton: FAILED ({stops[-1]})")

    if stops and os.environ.get("DFLASH_GPU_FORCE") == "1":
        print(f"preflight: problems ({'; '.join(stops)}), going on: DFLASH_GPU_FORCE=1")
        return 0
    if stops:
        print(f"preflight: STOP ({len(stops)} problem{'s' if len(stops) > 1 else ''}: {stops[0]}"
              f"{' …' if len(stops) > 1 else ''})")
        return 1
    print("preflight: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
