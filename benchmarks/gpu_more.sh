#!/usr/bin/env bash
# The second device call, for what benchmarks/gpu.sh has no time left for (under 9 minutes in all,
# timeout_s 560): DFlash2 exactness through the kernels and graphs, the Qwen3.8-27B and Qwen3.5-35B-A3B
# steps at real shapes, auto block size against plain decoding on the device, `dflash serve` on the
# device against `dflash run`, and `dflash train` on the device (bf16 autocast), with its step timed at
# Qwen3-4B shapes.
#   bash benchmarks/gpu_more.sh    (each part's log lands in $OUT when it is set; DEVICE=cpu rehearses)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/dflash-gpu-more}"
dev="${DEVICE:-cuda}"
mkdir -p "$out"

source benchmarks/part.sh

stage_package

part 100 dflash2-check python benchmarks/gpu_check.py --device "$dev" --only tiny-dflash2
part 45 dflash2-step python -m dflash_cli.cli bench --synthetic qwen3.8-27b --tau 6.0 --device "$dev"
part 45 hybrid-moe-step python -m dflash_cli.cli bench --synthetic qwen3.5-35b-a3b --tau 6.0 --device "$dev"
# Auto block size (the default) through graphs per b, in float32: the same tokens as plain decoding.
auto_vs_plain() {
  local a b
  a=$(python -m dflash_cli.cli run demo --device "$dev" --dtype float32 -p "The old owl sat in the tall tree" -n 200 --json -q) || return 1
  b=$(python -m dflash_cli.cli run demo --device "$dev" --dtype float32 -p "The old owl sat in the tall tree" -n 200 --json -q --no-spec) || return 1
  python -c 'import json, sys; a, b = (json.loads(x) for x in sys.argv[1:]); same = a["token_ids"] == b["token_ids"]
print("auto", a["block_sizes"][:40], "τ", a["mean_acceptance_length"], "same as plain:", same); sys.exit(0 if same else 1)' "$a" "$b"
}
export -f auto_vs_plain
export dev
part 60 auto-vs-plain bash -c auto_vs_plain
part 70 demo-bench python -m dflash_cli.cli bench demo --device "$dev"
part 90 serve-check python benchmarks/serve_check.py --device "$dev"
part 60 train python -m dflash_cli.cli train --target demo --out "$(mktemp -d)/drafter" --steps 300 -b 8 \
    --draft-layers 2 --max-answer-tokens 64 --device "$dev" --yes
# dflash train's step at Qwen3-4B shapes: tokens/s and the projected hours of a full run.
part 60 train-speed python benchmarks/train_speed.py --shape qwen3-4b --steps 5 --device "$dev"
