#!/usr/bin/env bash
# One device call on one H200, under 9 minutes in all: correctness first, then timings, the
# fast-path table printed last. Needs torch (CUDA), triton, transformers, safetensors, pytest and
# scipy where it runs (the H200 image has them); this package is staged, not installed.
#   bash benchmarks/gpu.sh         (each part's log, and gpu.json, land in $OUT when it is set)
# Each part has its own time limit and a failing part does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/dflash-gpu}"
mkdir -p "$out"

part() {  # part SECONDS NAME COMMAND...: run with a limit, log to $out/NAME.txt, report a failure
  local seconds=$1 name=$2
  shift 2
  echo "== $name (limit ${seconds}s)"
  timeout -k 5 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The package as pyproject.toml lays it out (kernels/ is dflash_cli.kernels), staged without pip.
stage=$(mktemp -d)
cp -r dflash_cli "$stage/" && rm -rf "$stage/dflash_cli/kernels" && cp -r kernels "$stage/dflash_cli/kernels"
export PYTHONPATH="$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

part 140 gpu-check python benchmarks/gpu_check.py
part 110 fast-path python benchmarks/gpu.py --shape qwen3-8b --tau 6.4 --json "$out/gpu.json"
# The other families' steps at their real shapes (hybrid: verify + masked replay; MoE: the expert kernel).
part 40 hybrid-step python -m dflash_cli.cli bench --synthetic qwen3.5-27b --tau 6.0
part 40 moe-step python -m dflash_cli.cli bench --synthetic qwen3-coder-30b-a3b --tau 6.0
part 80 kernels python benchmarks/kernels.py
# The cheap kernel files first; the compile test skips itself (it records launches in the interpreter).
part 130 kernel-tests python -m pytest -q -p no:cacheprovider tests/kernels/test_rmsnorm.py \
    tests/kernels/test_swiglu.py tests/kernels/test_rope_cache.py tests/kernels/test_attention.py \
    tests/kernels/test_gated_delta.py tests/kernels/test_moe.py tests/kernels/test_accept.py \
    tests/kernels/test_sample.py tests/kernels/test_engine_kernels.py
echo
echo "== the fast-path table (again, last)"
grep -A 8 '^| check' "$out/fast-path.txt" || echo "(no table: see fast-path above)"
