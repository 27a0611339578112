#!/usr/bin/env bash
# One device call on one H200, under 9¾ minutes in all (timeout_s 590): correctness first, then timings, the
# fast-path table printed last. Needs torch (CUDA), triton, transformers, safetensors, pytest and
# scipy where it runs (the H200 image has them); this package is staged, not installed.
#   bash benchmarks/gpu.sh         (each part's log, and gpu.json, land in $OUT when it is set)
# Each part has its own time limit and a failing part does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/dflash-gpu}"
mkdir -p "$out"

source benchmarks/part.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
stage_package
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

part 140 gpu-check python benchmarks/gpu_check.py
part 110 fast-path python benchmarks/gpu.py --shape qwen3-8b --tau 6.4 --json "$out/gpu.json"
# The other families' steps at their real shapes (hybrid: verify + masked replay; MoE: the expert kernel).
part 35 hybrid-step python -m dflash_cli.cli bench --synthetic qwen3.5-27b --tau 6.0
part 35 moe-step python -m dflash_cli.cli bench --synthetic qwen3-coder-30b-a3b --tau 6.0
part 35 gpt-oss-step python -m dflash_cli.cli bench --synthetic gpt-oss-20b --tau 5.0
part 80 kernels python benchmarks/kernel_speed.py
# The cheap kernel files first; the compile test skips itself (it records launches in the interpreter).
part 130 kernel-tests python -m pytest -q -p no:cacheprovider tests/kernels/test_rmsnorm.py \
    tests/kernels/test_swiglu.py tests/kernels/test_rope_cache.py tests/kernels/test_attention.py \
    tests/kernels/test_gated_delta.py tests/kernels/test_moe.py tests/kernels/test_accept.py \
    tests/kernels/test_sample.py tests/kernels/test_engine_kernels.py
echo
echo "== the fast-path table (again, last)"
grep -A 8 '^| check' "$out/fast-path.txt" || echo "(no table: see fast-path above)"
