#!/usr/bin/env bash
# The one-shot GPU run (issue 29): one run inside a 15-minute device budget (a machine's start takes 2-4 of
# them) on an H100/H200 (torch 2.11, triton 3.6, Python 3.12, no network). The parts run in the order of the
# value of what they tell, so that a run cut anywhere has told the most it could:
#   1 install      pip install -e . with RWP_FAST_REQUIRE_CUDA_EXT=1 (a failed build retries without _C)
#   2 headline     rwp-fast bench released,fast (the phases captured as CUDA graphs, the default): AT-RWP then
#                  AT, PreAct ResNet-18 b128: images/s, ×released, RWP/AT time, the steps by mode, seconds to
#                  the first step and to the first captured step (the compile and capture cost)
#   3 captured     the captured step equals the uncaptured one (gpu tests, fp32, small model)
#   4 tracking     the bf16 tracking test, captured mode only (PreAct-18, 30 steps against the fp32 reference)
#   5 variants     rwp-fast bench compiled,no-compile: what the capture buys, what compiling adds
#   6 verify       rwp-fast verify on lsc_loss (the op that failed last time) × cuda,triton × fp32,bf16,fp16,
#                  and --steps 2
#   7 micro        the op microbenchmarks, only if time is left
#   8 sanitizer    compute-sanitizer memcheck ("not supported" is no FAIL; gVisor machines refuse it)
# The time plan is bench/device_plan.tsv: each part's cap and minimum at TOTAL_S=480, scaled by TOTAL_S/480.
# A part runs for at most min(its cap, the time left before the deadline T0 + TOTAL_S - 5 s, less timeout's
# 5-s kill grace); a part with less time left than its minimum is skipped, and its status says so.
#
# Nothing is lost when the run is cut (the device tool kills the command at its limit): every part's output
# streams into $OUT/run.log as it runs; every bench row is written to its JSON the moment it is timed, before
# any profiler runs; verify rewrites its JSON after each op; results.json and summary.txt are rebuilt after
# every part. $OUT receives at most 8 files, each under 16 MiB (the device tool's limits):
#   run.log       every part's output, streamed, between "==== part NAME start ..." and "==== part NAME end ..."
#   results.json  everything, ready to copy into bench/results/ (rebuilt after every part), with the plan and
#                 the accounting (each part's seconds, cap, limit; the wall time against TOTAL_S)
#   summary.txt   one line per part, then the bench table, the verify verdict, the tests' outcomes
#   env.txt       GPU, driver, versions, commit
#   bench.json    variants.json    verify.json    micro.json    the raw outputs of parts 2, 5, 6, 7
#
#   OUT=/some/dir bash bench/device_run.sh [--total-s N | N]     # on the GPU machine; TOTAL_S default 480
#   bash bench/device_run.sh --dry-run [--total-s N]             # on CPU, tiny sizes (tests/test_device_run.py)
# The dry run compiles the fast step's phases on CPU (RWP_FAST_COMPILE_BACKEND=aot_eager: Dynamo's tracing
# and AOT autograd as Inductor runs them, without the C++ compile), so a phase that does not trace on this
# torch shows there (a fullgraph fallback in the bench rows), not first on the GPU.
# Knobs: PARTS (space-separated part names to run, e.g. "install headline"; all when unset),
# HEADLINE_VARIANTS (released,fast), MORE_VARIANTS (compiled,no-compile), PYTHON, TOTAL_S (the argument wins),
# RWP_FAST_CUDA_ARCHS (default 90 here), MAX_JOBS (default 16), DEVICE=cpu (= --dry-run).
set -u

DRY=0
TOTAL_S="${TOTAL_S:-480}"
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --total-s) TOTAL_S=${2:?--total-s needs seconds}; shift ;;
        --total-s=*) TOTAL_S=${1#--total-s=} ;;
        [0-9]*) TOTAL_S=$1 ;;
        *) echo "device_run.sh: unknown argument $1 (--dry-run, --total-s N or N)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$TOTAL_S" =~ ^[0-9]+$ ]] || { echo "device_run.sh: TOTAL_S must be whole seconds, got $TOTAL_S" >&2; exit 2; }
[ "${DEVICE:-cuda}" = "cpu" ] && DRY=1
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
T0=${EPOCHREALTIME/./}  # microseconds
PLAN_TOTAL_S=480  # the TOTAL_S that bench/device_plan.tsv is written for
RESERVE_S=5       # of TOTAL_S, never given to a part: the final collect
KILL_S=5          # timeout's grace between its TERM at a part's limit and its KILL: also kept from every limit
DEADLINE=$(( T0 + (TOTAL_S - RESERVE_S) * 1000000 ))
# python3: the GPU image's interpreter with torch (a bare 'python' may not exist there)
PYTHON="${PYTHON:-python3}"
export RWP_FAST_CUDA_ARCHS="${RWP_FAST_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
ulimit -c 0  # a part aborted at its limit (below) writes no core file: a GPU process's could take minutes
# what Dynamo recompiled and where a graph broke, in the log of the part that did it
export TORCH_LOGS="${TORCH_LOGS-recompiles,graph_breaks}"
WORK="$(mktemp -d)"  # the per-op micro JSONs and the part statuses; all that matters is also under $OUT
trap 'rm -rf "$WORK"' EXIT
STATUS="$WORK/status.tsv"
LOG="$OUT/run.log"
: > "$STATUS"
: > "$LOG"
if [ "$DRY" = 1 ]; then
    DEV=cpu
    # The Triton interpreter, as in CI: the dry run checks the script and its Python, not the GPU.
    export TRITON_INTERPRET=1
    export RWP_FAST_COMPILE_BACKEND="${RWP_FAST_COMPILE_BACKEND-aot_eager}"
else
    DEV=cuda
fi
export WORK DEV PYTHON OUT DRY  # used by the functions that parts run in a child bash (timeout runs programs)

declare -A CAP MIN
while read -r name cap min _; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    CAP[$name]=$(( cap * TOTAL_S / PLAN_TOTAL_S ))
    MIN[$name]=$(( min * TOTAL_S / PLAN_TOTAL_S > 1 ? min * TOTAL_S / PLAN_TOTAL_S : 1 ))
done < bench/device_plan.tsv

now_us() { echo "${EPOCHREALTIME/./}"; }
seconds() { printf '%d.%d' $(( $1 / 1000000 )) $(( $1 % 1000000 / 100000 )); }  # µs -> s, one decimal

# part NAME CMD...: run CMD for at most min(cap, time to the deadline) seconds, its output appended to
# $OUT/run.log as it comes; record "name<TAB>status<TAB>seconds<TAB>limit<TAB>cap" and rebuild $OUT's
# summary. Skipped, and said so, when less than the part's minimum is left. Never stops the script.
part() {
    local name=$1
    shift
    local cap=${CAP[$name]:?no plan for part $name in bench/device_plan.tsv} min=${MIN[$name]}
    local wanted=" ${PARTS:-} " left limit t rc took status
    [[ "$wanted" == *" install "* ]] && wanted+="install_without_cuda_ext "  # the fallback comes with it
    if [ -n "${PARTS:-}" ] && [[ "$wanted" != *" $name "* ]]; then
        printf '%s\tskipped: not in PARTS=%s\t0\t0\t%s\n' "$name" "$PARTS" "$cap" >> "$STATUS"
        echo "== $name: skipped (PARTS=$PARTS)"
        return 0
    fi
    left=$(( (DEADLINE - $(now_us)) / 1000000 - KILL_S ))
    status=
    if [ "$cap" -lt 1 ]; then  # 'timeout 0' would be no limit at all
        status="skipped: the plan gives it ${cap}s at TOTAL_S=${TOTAL_S}s"
    elif [ "$left" -lt "$min" ]; then  # min >= 1: a part never starts with less than 1 s
        status="skipped: ${left}s left of TOTAL_S=${TOTAL_S}s, the plan needs ${min}s (cap ${cap}s)"
    fi
    if [ -n "$status" ]; then
        printf '%s\t%s\t0\t0\t%s\n' "$name" "$status" "$cap" >> "$STATUS"
        echo "==== part $name $status ====" >> "$LOG"
        echo "== $name: $status"
        collect
        return 124
    fi
    limit=$(( left < cap ? left : cap ))
    export PART_LIMIT=$limit  # the bench parts plan their --time-budget from it
    echo "== $name (limit ${limit}s of cap ${cap}s): $*"
    echo "==== part $name start $(date -u +%T) limit ${limit}s cap ${cap}s: $* ====" >> "$LOG"
    t=$(now_us)
    # SIGABRT at the limit: with PYTHONFAULTHANDLER a Python part prints every thread's stack into run.log
    # before it dies, so a part cut at its limit says where it was (a compile, a capture, a test)
    timeout --signal=ABRT --kill-after="$KILL_S" "$limit" "$@" >> "$LOG" 2>&1 < /dev/null
    rc=$?
    took=$(seconds $(( $(now_us) - t )))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT at its limit" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    echo "==== part $name end: $status (${took}s) ====" >> "$LOG"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$limit" "$cap" >> "$STATUS"
    echo "$name: $status (${took}s)"
    collect
    return $rc
}

collect() {
    # results.json and summary.txt from whatever the parts have left so far: stdlib only, run by its path so
    # that it works even when the install part failed and rwp_fast.bench is not importable
    "$PYTHON" bench/device_results.py --out "$OUT" --work "$WORK" --dry-run "$DRY" --total-s "$TOTAL_S" \
        --wall-s "$(seconds $(( $(now_us) - T0 )))" > /dev/null 2>> "$WORK/collect.err" \
        || echo "collect: failed, see $WORK/collect.err" >&2
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run on CPU (tiny sizes; no figure is a measurement)' || echo 'GPU run'), TOTAL_S=$TOTAL_S"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# bench_part JSON VARIANTS: rwp-fast bench at the run's size, AT-RWP then AT; --time-budget (configurations not
# started by then become 'skipped' rows) leaves a fifth of the part's limit for the one in flight and the report
bench_part() {
    local size=(--device cuda --model preact_resnet18 --batch-size 128 --steps 5 --repeats 3 --warmup 2)
    [ "$DEV" = cpu ] && size=(--device cpu --smoke --steps 1 --repeats 1 --warmup 1)
    "$PYTHON" -m rwp_fast.cli bench "${size[@]}" --methods at-rwp,at --variants "$2" --no-progress \
        --time-budget $(( PART_LIMIT * 4 / 5 )) --json "$OUT/$1"
}
export -f bench_part

# gpu_tests -k EXPR FILE...: gpu-marked pytests; on CPU they are collected and skipped ("needs CUDA"), which
# checks the names. -v: one line per test as it ends, so a part cut at its limit still says which passed.
gpu_tests() { "$PYTHON" -m pytest -v -p no:cacheprovider -m gpu "$@"; }
export -f gpu_tests

# ---------------------------------------------------------------------------------------------- 1 install
if [ "$DRY" = 1 ]; then
    part install "$PYTHON" -c "import rwp_fast, rwp_fast.bench.user, rwp_fast.verify.run; print('dry run: install skipped, package importable')"
elif ! part install env RWP_FAST_REQUIRE_CUDA_EXT=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
    # the extension is what failed most likely: install without it so that the Triton parts still run
    part install_without_cuda_ext env RWP_FAST_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip install --no-build-isolation \
        --no-deps -e .
fi

# ---------------------------------------------------------------------------------------------- 2 headline
part headline bash -c 'bench_part bench.json "${HEADLINE_VARIANTS:-released,fast}"'

# ---------------------------------------------------------------------------------------------- 3 captured
part captured bash -c 'gpu_tests -k captured_step_equals_the_uncaptured tests/test_captured_phases.py'

# ---------------------------------------------------------------------------------------------- 4 tracking
part tracking bash -c 'gpu_tests -k "tracks_the_fp32_reference and cuda-graphs" tests/test_fast_step.py'

# ---------------------------------------------------------------------------------------------- 5 variants
part variants bash -c 'bench_part variants.json "${MORE_VARIANTS:-compiled,no-compile}"'

# ---------------------------------------------------------------------------------------------- 6 verify
if [ "$DRY" = 1 ]; then
    # seconds, not minutes: the interpreter on the odd sizes, fp32 and fp16 (tests/test_verify.py checks the rest)
    part verify "$PYTHON" -m rwp_fast.cli verify --device cpu --quick --ops lsc_loss --dtypes fp32,fp16 --families odd --steps 1 \
        --json "$OUT/verify.json"
else
    part verify "$PYTHON" -m rwp_fast.cli verify --device cuda --ops lsc_loss --backends cuda,triton \
        --require cuda,triton --dtypes fp32,bf16,fp16 --steps 2 --json "$OUT/verify.json"
fi

# ---------------------------------------------------------------------------------------------- 7 micro
micro() {
    # lsc_loss first: the op that failed last time. Each op may use what is left of the part (its JSON is
    # written when it ends), so a slow first op leaves the others out rather than cutting all three short.
    local op rc=0 left flags=(--no-compile) ops=(lsc_loss pgd_step weight_perturb)
    # dry run: one op shows the plumbing works (pytest runs every bench_<op>.py on tiny sizes anyway)
    [ "$DEV" = cpu ] && flags+=(--quick) && ops=(pgd_step)
    for op in "${ops[@]}"; do
        left=$(( PART_LIMIT - SECONDS - 1 ))
        [ "$left" -lt 3 ] && { echo "micro $op: skipped: ${left}s left of the part"; continue; }
        timeout --kill-after=1 "$left" "$PYTHON" -m "rwp_fast.bench.bench_$op" --device "$DEV" \
            --json "$WORK/micro_$op.json" "${flags[@]}" || { rc=$?; echo "micro $op: rc=$rc"; }
    done
    return $rc
}
export -f micro
part micro bash -c micro

# ---------------------------------------------------------------------------------------------- 8 sanitizer
sanitizer() {
    local cs
    cs="$(command -v compute-sanitizer || true)"
    [ -z "$cs" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && cs="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
    if [ -z "$cs" ]; then
        echo "SANITIZER: not supported: compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
        return 0
    fi
    if [ "$DEV" != cuda ]; then
        echo "SANITIZER: not supported: no CUDA device (dry run)"
        return 0
    fi
    local log="$WORK/sanitizer.raw"
    "$cs" --tool memcheck --error-exitcode 1 "$PYTHON" bench/sanitize_cuda_ops.py > "$log" 2>&1
    local rc=$?
    cat "$log"
    if [ $rc -eq 0 ]; then
        echo "SANITIZER: PASS (memcheck: no errors)"
    elif grep -qiE "not supported|unsupported|unable to (connect|attach|find)|failed to (connect|launch)|Target application terminated before" "$log" \
            && ! grep -qE "ERROR SUMMARY: [1-9]" "$log"; then
        echo "SANITIZER: not supported: $(grep -iE 'not supported|unsupported|unable|failed to' "$log" | head -1)"
        return 0
    else
        echo "SANITIZER: FAIL (rc=$rc; $(grep -E 'ERROR SUMMARY' "$log" | tail -1))"
    fi
    return $rc
}
export -f sanitizer
part sanitizer bash -c sanitizer

# ---------------------------------------------------------------------------------------------- report
collect
echo
echo "==================== summary ($(seconds $(( $(now_us) - T0 )))s of TOTAL_S=${TOTAL_S}s) ===================="
cat "$OUT/summary.txt" 2>/dev/null
[ -s "$WORK/collect.err" ] && { echo "collect errors:"; tail -20 "$WORK/collect.err"; }
exit 0
