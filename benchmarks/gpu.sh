#!/usr/bin/env bash
# One device call on one H200 (< 8 minutes): kernel micro-benchmarks, then the fast-path table.
# Run from a checkout with torch (CUDA), triton and this package importable:
#   bash benchmarks/gpu.sh            (writes JSON into $OUT when it is set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if [ -f benchmarks/kernels.py ]; then timeout 240 python benchmarks/kernels.py | tee "$out/kernels.txt"; fi
timeout 300 python benchmarks/gpu.py --shape qwen3-8b --tau 6.4 --json "$out/gpu.json" | tee "$out/gpu.txt"
