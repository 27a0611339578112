#!/usr/bin/env bash
# The GPU check, call 1 of 2 (research/gpu-review-2.md §4). Call 2 is benchmarks/gpu_more.sh, issued as
# soon as this one returns, so that it lands on the still-warm machine (30 s): its Triton cache and
# installed wheels are then still there.
#   once, here:      bash benchmarks/gpu_wheels.sh          (fills the git-ignored .whl/)
#   the device call: command "bash benchmarks/gpu.sh", carry [".whl"], timeout_s 480
#   a rehearsal:     DEVICE=cpu bash benchmarks/gpu.sh      (tiny shapes, the kernels in Triton's interpreter)
# The parts get BUDGET seconds (465: the summary is written by about 450 s, 30 s inside timeout_s); each
# part's limit is cut to what is left (benchmarks/part.sh), so the call always ends with its summary.
# Stdout ends with that summary (< 8 kB: the card, every part's exit line, verdicts, tables, error
# lines); $OUT gets summary.txt, logs.tgz (every part's full log), gpu.json and kernels.json.
#
# Expected wall time per part on a cold H100: ESTIMATES, not measurements (nothing has run on a GPU
# yet), from the review's compile counts: about 0.4-1 s per Triton specialisation on the device's host
# (Triton compiles single-threaded, one process each), about 8 s per process to import torch,
# transformers and fla, and 1-2 s per CUDA-graph capture. The machine's start (1-2 min) comes on top.
# Each part's limit is about 1.2-1.5 times its estimate's upper end, so that a slow compile does not
# lose the part; the call's deadline, not the sum of the limits, bounds the call.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/part.sh

setup gpu "${BUDGET:-465}"
run_preflight  # ~15-25 s: wheels ~3 s, imports ~10 s (fla ~3-8 s), one kernel compiled ~2 s

# A. Correctness, in parallel (one process per case: a failure loses nothing else). The GPU is
# shared, so nothing here is timed; the compiles it does warm the cache for part B.
if [ "$dev" = cpu ]; then  # the rehearsal: two torch rows, a failure planted in the second
    background 120 check-tiny "$PY" benchmarks/gpu_check.py --device cpu --only tiny --rows 2 --fail tiny:1
    background 120 check-tiny-hybrid "$PY" benchmarks/gpu_check.py --device cpu --only tiny-hybrid --rows 1
    pytest_flags 2 60
    background 150 kernel-tests "$PY" -m pytest "${PYTEST[@]}" tests/kernels/test_gated_delta.py \
        tests/kernels/test_swiglu.py
else
    # each tiny case: 7 rows (torch, kernels, graphs, lookahead), ~20-30 fp32 compiles: ~40-70 s;
    # tiny-hybrid also fla's recurrent kernel and the 200-token prefill (fla's chunked kernel autotunes
    # ~34 variants): ~60-100 s
    for case in tiny tiny-hybrid tiny-moe tiny-gpt-oss tiny-dflash2; do
        background 150 "check-$case" "$PY" benchmarks/gpu_check.py --only "$case"
    done
    # 3 rows at Qwen3-8B shapes, bf16 (16 GB of random weights each), ~30 bf16 compiles: ~60-100 s
    background 170 check-qwen3-8b "$PY" benchmarks/gpu_check.py --only qwen3-8b
    # ~340 tests, ~150-250 compiles over 6 workers (16 cores beside the 6 checks): ~100-160 s. --timeout
    # 120 per test, not 60: the first chunked-prefill test compiles and autotunes fla's chunked kernel.
    pytest_flags 6 120
    background 170 kernel-tests "$PY" -m pytest "${PYTEST[@]}" tests/kernels
fi
wait_background  # ~120-170 s in all (the slowest of them)

# B. The timed parts, one at a time, alone on the GPU. Each prints `[  t s]` phase lines as it goes.
if [ "$dev" = cpu ]; then dense=tiny hybrid=tiny-hybrid moe=tiny-moe gptoss=tiny-gpt-oss table=(--table)
else dense=qwen3-8b hybrid=qwen3.5-27b moe=qwen3-coder-30b-a3b gptoss=gpt-oss-20b table=(); fi
synthetic=("$PY" benchmarks/gpu.py --device "$dev" --json "$out/gpu.json")
# The acceptance table at Qwen3-8B (16 GB): weights ~5 s, compiles mostly cached by check-qwen3-8b,
# captures (engine, plain, 4 phases, 4 block sizes) ~15 s, timing ~10 s: ~40-60 s
part 90 fast-path "${synthetic[@]}" --shape "$dense" --tau 6.4 "${table[@]}"
# F.linear M=1 vs M=16 per Qwen3-8B weight first (~10 s), then kernel rows until 35 s: ~45 s
[ "$dev" = cpu ] && kernel_budget=5 || kernel_budget=35  # an interpreted row takes seconds
part 50 kernels "$PY" benchmarks/kernel_speed.py --device "$dev" --budget "$kernel_budget" --json "$out/kernels.json"
# Qwen3.5-27B, 54 GB: head-256 attention, fla's recurrent kernel at real heads, ~25 new compiles: ~50-75 s
part 90 hybrid-step "${synthetic[@]}" --shape "$hybrid" --tau 6.0
# Qwen3-Coder-30B-A3B, 61 GB: the fused expert kernel, ~20 new compiles: ~45-60 s
part 75 moe-step "${synthetic[@]}" --shape "$moe" --tau 6.0
# gpt-oss-20b, 13 GB (MXFP4): sinks, windows, MXFP4 experts, ~25 new compiles: ~40-60 s
part 75 gpt-oss-step "${synthetic[@]}" --shape "$gptoss" --tau 5.0

finish  # ~2 s
