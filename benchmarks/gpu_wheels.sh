#!/usr/bin/env bash
# Downloads, HERE (where pip reaches PyPI), the wheels the GPU machine's image lacks for
# benchmarks/gpu.sh and gpu_more.sh, into the git-ignored folder .whl/ at the repo root. The device
# call then carries it (`carry: [".whl"]`) and the scripts install it offline (benchmarks/part.sh,
# `install_wheels`: pip install --no-index --no-deps --target .gpu-cache/site).
#   bash benchmarks/gpu_wheels.sh        (once per checkout that makes the device call; about 1.3 MB)
#
# What the image lacks (/work/.library/device/KINDS.md, "Python packages already there"), and why:
#   fla-core 0.6.0   the hybrid's Gated DeltaNet kernels (kernels/gated_delta.py); it imports einops
#                    and packaging, which the image has
#   starlette, uvicorn  `dflash serve` (benchmarks/serve_check.py); they need anyio>=4, typing-extensions,
#                    click and h11, which the image has
# Not carried: prompt-toolkit (only `dflash chat` imports it, lazily) and openai (only the CPU tests).
# The versions are the ones the test suite runs with on the development machine. The image's Python
# is 3.12 (KINDS.md); all three are pure-Python wheels, so the platform tags below are the device
# README's recipe and only matter if a compiled wheel is ever added.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(fla-core==0.6.0 starlette==1.10.0 uvicorn==0.55.0)

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" 2>&1 \
    | grep -v "^WARNING: Location" || true

# One wheel per name (two versions of one package stop the whole install there), and every pin present.
count=$(ls .whl/*.whl | wc -l)
if [ "$count" != "${#WHEELS[@]}" ]; then
    echo "gpu_wheels: expected ${#WHEELS[@]} wheels, got $count:" >&2
    ls .whl >&2
    exit 1
fi
for pin in "${WHEELS[@]}"; do
    name=${pin%%==*} version=${pin##*==}
    ls .whl/"${name//-/_}-$version-"*.whl >/dev/null || { echo "gpu_wheels: no wheel for $pin" >&2; exit 1; }
done
for whl in .whl/*.whl; do
    needs=$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
            | sed 's/^Requires-Dist: //' | paste -sd ',' -)
    echo "$(basename "$whl")  needs: ${needs:-nothing}"
done
if ! grep -qx '/.whl/' .gitignore 2>/dev/null; then
    echo "gpu_wheels: warning: /.whl/ is not in .gitignore: the wheels would be committed" >&2
fi
du -sh .whl | awk '{print "gpu_wheels: " $1 " in .whl/ (carry it: carry [\".whl\"])"}'
