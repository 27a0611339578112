#!/usr/bin/env bash
# The GPU check, call 2 of 2 (research/gpu-review-2.md §4): issue it AS SOON AS call 1
# (benchmarks/gpu.sh) returns, so that it lands on the still-warm machine (it stays 30 s): the
# Triton cache and the installed wheels (.gpu-cache/, git-ignored, kept while the machine is warm) are
# then still there.
# On a fresh machine it still runs (the wheels are installed again), only slower, and cut to fit.
#   the device call: command "bash benchmarks/gpu_more.sh", carry [".whl"], timeout_s 240
#   a rehearsal:     DEVICE=cpu bash benchmarks/gpu_more.sh
# What it checks: auto block size against plain decoding in float32 through graphs per b (the same
# tokens), `dflash serve` against `dflash run` on the device, `dflash train` on the device (bf16
# autocast), the Qwen3.8-27B (DFlash2) step, dflash train's step at Qwen3-4B shapes, then the rest of
# the kernel table in whatever time is left. The parts get BUDGET seconds (215: the summary is
# written by about 200 s, 40 s inside timeout_s). Stdout ends with the summary; $OUT gets
# summary.txt, logs.tgz and gpu_more.json. Dropped for the first GPU run (review §4): `dflash bench
# demo` (auto-vs-plain covers it) and the Qwen3.5-35B-A3B step (70 GB: too close to an H100's 80).
#
# Expected wall time per part on the warm H100: ESTIMATES (nothing has run on a GPU yet; see gpu.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/part.sh

setup gpu-more "${BUDGET:-215}"
run_preflight  # ~10-15 s (the wheels already installed on a warm machine)

# A. The demo pair's correctness, in parallel (tiny models: the GPU is shared, nothing is timed).
auto_vs_plain() {  # auto block size (the default), float32: the same tokens as plain decoding
    local a b
    a=$("$PY" -m dflash_cli.cli run demo --device "$dev" --dtype float32 -p "The old owl sat in the tall tree" \
        -n 200 --json -q) || return 1
    b=$("$PY" -m dflash_cli.cli run demo --device "$dev" --dtype float32 -p "The old owl sat in the tall tree" \
        -n 200 --json -q --no-spec) || return 1
    "$PY" -c 'import json, sys; a, b = (json.loads(x) for x in sys.argv[1:]); same = a["token_ids"] == b["token_ids"]
print("auto", a["block_sizes"][:40], "τ", a["mean_acceptance_length"], "same as plain:", same); sys.exit(0 if same else 1)' "$a" "$b"
}
export -f auto_vs_plain
export dev PY
[ "$dev" = cpu ] && steps=20 || steps=100
background 75 auto-vs-plain bash -c auto_vs_plain  # two runs of the demo pair: ~20-40 s
background 90 serve-check "$PY" benchmarks/serve_check.py --device "$dev"  # run, then serve twice: ~30-50 s
background 90 train "$PY" -m dflash_cli.cli train --target demo --out "$work/scratch/drafter" --steps "$steps" -b 8 \
    --draft-layers 2 --max-answer-tokens 64 --device "$dev" --yes  # answers, then 100 steps: ~30-60 s
wait_background  # ~40-60 s

# B. Timed, one at a time.
if [ "$dev" = cpu ]; then dflash2=tiny-dflash2 speed=(--shape tiny --length 256 --steps 2)
else dflash2=qwen3.8-27b speed=(--shape qwen3-4b --length 1024 --steps 5); fi
# Qwen3.8-27B (a hybrid target, DFlash2 drafter): the selector's walk at real shapes: ~45-65 s
part 75 dflash2-step "$PY" benchmarks/gpu.py --device "$dev" --shape "$dflash2" --tau 6.0 --json "$out/gpu_more.json"
# dflash train's step at Qwen3-4B shapes, at the review's first-run size (F7: masked GQA attention may
# fall to SDPA's math kernel at the default 512 anchors × batch 4): ~30-45 s
part 60 train-speed "$PY" benchmarks/train_speed.py "${speed[@]}" --anchors 64 --batch 1 --device "$dev"
# The GEMM rows again, then as many kernel rows as the time left allows (their compiles are cached
# from call 1 on a warm machine): the rest, ~30-50 s. Its budget leaves ~20 s of its limit for the
# process's start and the last row.
left=$(time_left)
if [ "$dev" = cpu ]; then kernel_budget=5; else kernel_budget=$(((left < 90 ? left : 90) - 20)); fi
part 90 kernels-more "$PY" benchmarks/kernel_speed.py --device "$dev" --budget "$kernel_budget"

finish
