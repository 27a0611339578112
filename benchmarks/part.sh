# Sourced by gpu.sh and gpu_more.sh: `part SECONDS NAME COMMAND...` runs a command with a time limit,
# logs it to $out/NAME.txt and reports a failure without stopping the script; `stage_package` puts the
# package on PYTHONPATH as pyproject.toml lays it out (kernels/ is dflash_cli.kernels), without pip.
part() {
  local seconds=$1 name=$2
  shift 2
  echo "== $name (limit ${seconds}s)"
  timeout -k 5 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
}

stage_package() {
  local stage
  stage=$(mktemp -d)
  cp -r dflash_cli "$stage/" && rm -rf "$stage/dflash_cli/kernels" && cp -r kernels "$stage/dflash_cli/kernels"
  export PYTHONPATH="$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
