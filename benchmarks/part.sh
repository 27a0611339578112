# Sourced by benchmarks/gpu.sh and gpu_more.sh: the harness of one device call.
#
#   setup CALL BUDGET       results folder ($OUT, else /tmp/dflash-CALL-out), a logs folder, the call's
#                           deadline (BUDGET seconds from now), the carried wheels installed, the package
#                           staged, the Triton cache in .gpu-cache/ (see CACHE)
#   run_preflight           nvidia-smi, then benchmarks/preflight.py; on its STOP the summary and exit 3
#   part LIMIT NAME CMD...  a serial part, alone on the GPU: its output on the terminal and in NAME.log
#   background LIMIT NAME CMD...  a part in parallel with others (correctness, which also warms the
#                           compile cache): its output in NAME.log only
#   wait_background         waits for the background parts, a line as each ends
#   finish                  summary.txt and logs.tgz in the results folder, the summary printed last;
#                           exit 0 if every part passed, 1 if one did not, 3 if preflight stopped the call
#
# Every part ends with `== NAME: exit N (S s of LIMIT s)`. A part's limit is the smaller of LIMIT and what
# is left before the deadline less RESERVE (the summary's time), so the call always ends with its
# summary even when parts run long; a part with under MIN_PART seconds left is skipped and says so.
# `timeout -k 5` ends a part's whole process group (a hung kernel, serve_check's server). At most 8
# files come back from $OUT: logs.tgz, summary.txt and the JSON files the parts write there.
# DEVICE=cpu rehearses a call on a CPU (the scripts then pick tiny shapes; kernels in Triton's interpreter).

# The machine keeps git-ignored outputs in the repo's copy between calls while it stays warm (the device
# README), so call 2 finds call 1's Triton compiles and installed wheels here; a fresh machine starts bare.
CACHE=$PWD/.gpu-cache  # git-ignored
RESERVE=20   # seconds kept for the summary and the tarball (about 2 s) and a margin for the call's own timeout
MIN_PART=15  # a part with less than this left is skipped, not started
PY=${PYTHON:-python3}  # the device image's python3 holds torch; a plain `python` may not exist there
BACKGROUND=()
LAST_RC=0

setup() {
    call=$1 budget=$2
    deadline=$((SECONDS + budget))
    dev=${DEVICE:-cuda}
    if [ -n "${OUT:-}" ]; then out=$OUT; else out=/tmp/dflash-$call-out; rm -rf "$out"; fi
    mkdir -p "$out"
    work=$(mktemp -d "/tmp/dflash-$call.XXXXXX")  # this call's scratch: logs, the staged package, train's output
    logs=$work/$call
    mkdir -p "$work/scratch"
    mkdir -p "$logs"
    : > "$logs/parts.tsv"
    export PYTHONUNBUFFERED=1
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton}
    export FLA_CACHE_RESULTS=1  # fla-core keeps its autotune choices in that cache (its default, made explicit)
    if [ "$dev" = cpu ]; then  # a rehearsal: the kernels can only run in Triton's interpreter
        export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    local cached
    cached=$(find "$TRITON_CACHE_DIR" -type f 2>/dev/null | wc -l)
    echo "== $call: $(date -u '+%F %T UTC') · budget ${budget} s · device $dev · Triton cache: $cached files" \
         "($([ "$cached" -gt 0 ] && echo 'warm: an earlier call ran on this machine' || echo cold))"
    install_wheels
    stage_package
    trap on_signal TERM INT
}

# The wheels the image lacks (benchmarks/gpu_wheels.sh put them in .whl/, which the call carries),
# installed offline into a fixed folder once per machine: a second call on a warm machine reuses it.
install_wheels() {
    local site=$CACHE/site want
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "wheels: none here (.whl/ not carried: run bash benchmarks/gpu_wheels.sh, then call with" \
             "carry [\".whl\"]); preflight will say what is missing"
        return
    fi
    want=$(cd .whl && ls -- *.whl | sort | tr '\n' ' ')
    if [ -f "$site/.installed" ] && [ "$(cat "$site/.installed")" = "$want" ]; then
        echo "wheels: already in $site (warm machine): $want"
    elif rm -rf "$site" && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl >"$logs/wheels.log" 2>&1; then
        echo "$want" > "$site/.installed"
        echo "wheels: installed into $site: $want"
    else
        echo "wheels: pip install FAILED (see wheels.log in logs.tgz): $(tail -1 "$logs/wheels.log")"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

# The package on PYTHONPATH as pyproject.toml lays it out (kernels/ is dflash_cli.kernels), without pip,
# and the repo root (benchmarks/ and tests/ import from it).
stage_package() {
    local stage=$work/stage
    mkdir -p "$stage"
    cp -r dflash_cli "$stage/" && rm -rf "$stage/dflash_cli/kernels" && cp -r kernels "$stage/dflash_cli/kernels"
    export PYTHONPATH="$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

run_preflight() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$logs/nvidia-smi.log" 2>&1
    else
        echo "no nvidia-smi here" >"$logs/nvidia-smi.log"
    fi
    echo "nvidia-smi: $(head -1 "$logs/nvidia-smi.log")"
    part 60 preflight "$PY" benchmarks/preflight.py --device "$dev"
    if [ "$LAST_RC" != 0 ]; then
        echo "== preflight stopped the call (its STOP line above says why; DFLASH_GPU_FORCE=1 runs the parts anyway)"
        PREFLIGHT_STOPPED=1
        finish
    fi
}

# Sets LIMIT_NOW to part $1's limit ($2, cut to the time left), or records the part as skipped and fails.
limit_for() {
    local name=$1 asked=$2 left
    left=$((deadline - RESERVE - SECONDS))
    if ((left < MIN_PART)); then
        skipped "$name" "no time left: ${left} s before the call's summary"
        return 1
    fi
    LIMIT_NOW=$((asked < left ? asked : left))
}

skipped() {
    echo "== $1: skipped ($2)"
    printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >>"$logs/parts.tsv"
}

ended() {  # NAME RC SECONDS LIMIT
    local note=""
    case $2 in 124 | 137) note="(time limit)" ;; esac
    echo "== $1: exit $2 ($3 s of $4 s)${note:+ $note}"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$note" >>"$logs/parts.tsv"
    LAST_RC=$2
}

part() {
    local name=$2 start=$SECONDS rc
    limit_for "$name" "$1" || return 0
    shift 2
    echo "== $name (limit $LIMIT_NOW s)"
    timeout -k 5 "$LIMIT_NOW" "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    ended "$name" "$rc" $((SECONDS - start)) "$LIMIT_NOW"
}

background() {
    local name=$2
    limit_for "$name" "$1" || return 0
    shift 2
    echo "== $name (in the background, limit $LIMIT_NOW s)"
    (
        start=$SECONDS
        timeout -k 5 "$LIMIT_NOW" "$@" >"$logs/$name.log" 2>&1 &
        echo $! >"$logs/$name.pid"  # for on_signal: timeout passes a TERM on to its command's group
        wait $!
        rc=$?
        echo "$rc $((SECONDS - start)) $LIMIT_NOW" >"$logs/$name.done"
    ) &
    BACKGROUND+=("$name")
}

wait_background() {
    local pending=("${BACKGROUND[@]}") still name rc seconds limit start=$SECONDS beat=$SECONDS
    while ((${#pending[@]})); do
        still=()
        for name in "${pending[@]}"; do
            if [ -f "$logs/$name.done" ]; then
                read -r rc seconds limit <"$logs/$name.done"
                ended "$name" "$rc" "$seconds" "$limit"
                [ "$rc" = 0 ] || tail -n 3 "$logs/$name.log" | sed 's/^/   | /'
            else
                still+=("$name")
            fi
        done
        pending=(${still[@]+"${still[@]}"})
        if ((${#pending[@]})) && ((SECONDS - beat >= 30)); then
            echo "   … $((SECONDS - start)) s: still running: ${pending[*]}"
            beat=$SECONDS
        fi
        ((${#pending[@]})) && sleep 1
    done
    wait
    BACKGROUND=()
}

# PYTEST: pytest's flags for the kernel tests: -n WORKERS and --timeout SECONDS (per test) where the
# image has pytest-xdist and pytest-timeout (KINDS.md lists both; preflight prints what it found).
# -v, not -q: a part cut short by its limit still names every test that finished, in its log.
pytest_flags() {
    PYTEST=(-p no:cacheprovider -v --tb=line -rfE)
    if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "$1"); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout "$2"); fi
}

time_left() {  # seconds before the summary's reserve
    echo $((deadline - RESERVE - SECONDS))
}

# The call's own timeout sends TERM first (when it does): end the parts, keep the summary.
on_signal() {
    echo "== $call: interrupted: ending the parts and writing the summary"
    local pidfile
    for pidfile in "$logs"/*.pid; do
        [ -f "$pidfile" ] && kill -TERM "$(cat "$pidfile")" 2>/dev/null
    done
    finish
}

finish() {
    trap - TERM INT
    local files
    if ! "$PY" -I benchmarks/gpu_summary.py "$logs" --call "$call" --budget "$budget" --elapsed "$SECONDS" \
            >"$out/summary.txt" 2>"$logs/summary-error.log"; then  # the plain fallback: every part's line
        { echo "(gpu_summary.py failed: $(tail -1 "$logs/summary-error.log"))"; grep -h '' "$logs/parts.tsv"
          grep -hE 'Error|Traceback|differs|FAILED' "$logs"/*.log | sort -u | head -40; } >"$out/summary.txt"
    fi
    tar -czf "$out/logs.tgz" -C "$work" "$call"
    rm -rf "$work/stage" "$work/scratch"
    files=$(find "$out" -type f | wc -l)
    if ((files > 8)); then
        echo "== warning: $files files in $out; the device returns 8 at most"
    fi
    echo
    cat "$out/summary.txt"
    if [ -n "${PREFLIGHT_STOPPED:-}" ]; then exit 3; fi
    if awk -F'\t' '$2 != "0" && $2 != "skipped" {bad = 1} END {exit !bad}' "$logs/parts.tsv"; then exit 1; fi
    exit 0
}
