#!/usr/bin/env bash
# The one-shot GPU run (issue 10 §6): one run of at most 9 minutes on an H100/H200 (torch 2.11, triton 3.6,
# Python 3.12, no network) settles correctness and the headline ratio, in this order of priority:
#   1 install      pip install -e . with RWP_FAST_REQUIRE_CUDA_EXT=1 (a failed build retries without _C)
#   2 verify       rwp-fast verify: every op × {cuda, triton} × {fp32, bf16, fp16} vs the reference, + 2 steps
#   3 headline     rwp-fast bench: released, fast (the phases captured as CUDA graphs, the default) and compiled
#                  (the same phases compiled, not captured), PreAct ResNet-18 b128, AT and AT-RWP, RWP/AT time,
#                  the mode each step ran in (a failed capture shows as a fallback), phase replays per step
#   4 extras       no-compile (the eager phase bodies captured), same sizes
#   5 micro        the op microbenchmarks with the fraction of copy bandwidth
#   6 tracking     the bf16 tracking test, the captured step against the uncaptured one, two --deterministic runs
#                  (gpu-marked pytests; never the interpreter suite)
#   7 sanitizer    compute-sanitizer memcheck on one small call of each CUDA op ("not supported" is no FAIL).
#                  Last: on gVisor machines it refuses the device (bench/results/README.md), and the
#                  static review found the CUDA code clean, so it must not take time from the figures.
# Parts run in the order 1, 2, 6, 3, 4, 5, 7: the correctness parts before the figures. Time plan, from the
# last full run (bench/results/2026-12-04-h200: 401 s) and estimated for the bench parts: install ~40 s,
# verify ~65, tracking ~80, headline ~150 (three variants, two of them compiling), extras ~30, micro ~30,
# sanitizer ~10: ~400 s of TOTAL_S, inside one 10-minute device call.
# Each part has its own time cap and is killed alone; every part also stops at the global deadline
# (TOTAL_S, default 540 s). $OUT receives at most 8 files, each under 16 MiB:
#   results.json  everything, ready to copy into bench/results/ (rewritten after every part)
#   summary.txt   one line per part, then the verify verdict and the bench table
#   env.txt       GPU, driver, versions, commit
#   verify.json   bench.json   extras.json   micro.json   the raw outputs of parts 2, 4, 5, 6
#   logs.txt      the tail of every part's log
#
#   OUT=/some/dir bash bench/device_run.sh            # on the GPU machine
#   bash bench/device_run.sh --dry-run                # on CPU, tiny sizes, seconds (CI: tests/test_bench_e2e.py)
# Knobs: PARTS (space-separated part names to run, e.g. "install verify tracking headline" for a rerun of
# the failing parts; all when unset), HEADLINE_VARIANTS, EXTRA_VARIANTS, PYTHON, TOTAL_S,
# RWP_FAST_CUDA_ARCHS (default 90 here), MAX_JOBS (default 16), DEVICE=cpu (= --dry-run).
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${DEVICE:-cuda}" = "cpu" ] && DRY=1
OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
# python3: the GPU image's interpreter with torch (a bare 'python' may not exist there)
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-540}"
export RWP_FAST_CUDA_ARCHS="${RWP_FAST_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STATUS="$WORK/status.tsv"
: > "$STATUS"
T0=$(date +%s)
DEADLINE=$(( T0 + TOTAL_S ))
if [ "$DRY" = 1 ]; then
    DEV=cpu
    # The Triton interpreter, as in CI: the dry run checks the script and its Python, not the GPU.
    export TRITON_INTERPRET=1
else
    DEV=cuda
fi
export WORK DEV PYTHON  # used by the functions that parts run in a child bash (timeout runs programs only)

# limit_for CAP_S: the limit a part started now gets, min(CAP_S, seconds to the deadline - 5)
limit_for() {
    local left=$(( DEADLINE - $(date +%s) - 5 ))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

# part NAME CAP_S CMD...: run CMD with min(CAP_S, time to the deadline) as limit, log to $WORK/NAME.log,
# record "name<TAB>status<TAB>seconds<TAB>limit" and rebuild results.json. Never stops the script.
part() {
    local name=$1 cap=$2
    shift 2
    local left limit t rc took status
    local wanted=" ${PARTS:-} "
    [[ "$wanted" == *" install "* ]] && wanted+="install_without_cuda_ext "  # the fallback comes with it
    if [ -n "${PARTS:-}" ] && [[ "$wanted" != *" $name "* ]]; then
        printf '%s\tskipped: not in PARTS=%s\t0\t%s\n' "$name" "$PARTS" "$cap" >> "$STATUS"
        echo "== $name: skipped (PARTS=$PARTS)"
        return 0
    fi
    left=$(( DEADLINE - $(date +%s) - 5 ))
    limit=$(limit_for "$cap")
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped: %ss left of TOTAL_S=%s\t0\t%s\n' "$name" "$left" "$TOTAL_S" "$cap" >> "$STATUS"
        echo "== $name: SKIPPED (${left}s left)"
        collect
        return 124
    fi
    echo "== $name (limit ${limit}s): $*"
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - t ))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT after ${took}s" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$limit" >> "$STATUS"
    echo "$name: $status (${took}s)"
    collect
    return $rc
}

collect() {
    # results.json, summary.txt and logs.txt from whatever the parts have left so far: stdlib only, run by
    # its path so that it works even when the install part failed and rwp_fast.bench is not importable
    "$PYTHON" bench/device_results.py --out "$OUT" --work "$WORK" --dry-run "$DRY" > /dev/null 2>> "$WORK/collect.err" \
        || echo "collect: failed, see logs.txt" >&2
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run on CPU (tiny sizes; no figure is a measurement)' || echo 'GPU run')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# ---------------------------------------------------------------------------------------------- 1 install
if [ "$DRY" = 1 ]; then
    part install 60 "$PYTHON" -c "import rwp_fast, rwp_fast.bench.user, rwp_fast.verify.run; print('dry run: install skipped, package importable')"
elif ! part install 300 env RWP_FAST_REQUIRE_CUDA_EXT=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
    # the extension is what failed most likely: install without it so that the Triton parts still run
    part install_without_cuda_ext 90 env RWP_FAST_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip install --no-build-isolation \
        --no-deps -e .
fi

# ---------------------------------------------------------------------------------------------- 2 verify
if [ "$DRY" = 1 ]; then
    # seconds, not minutes: the interpreter on two op families (tests/test_verify.py runs the rest on CPU)
    part verify 120 "$PYTHON" -m rwp_fast.cli verify --device cpu --quick --ops weight_perturb,pgd_step \
        --families odd --json "$OUT/verify.json"
else
    part verify 150 "$PYTHON" -m rwp_fast.cli verify --device cuda --require cuda,triton --dtypes fp32,bf16,fp16 \
        --model preact_resnet18 --steps 2 --json "$OUT/verify.json"
fi

# ---------------------------------------------------------------------------------------------- 6 tracking
# Only the gpu-marked tracking test; on CPU it is collected and skipped ("needs CUDA"), which checks the name.
# -v: one line per test as it ends, so a part cut at its limit still says which passed.
part tracking 170 "$PYTHON" -m pytest -v -p no:cacheprovider -m gpu \
    -k "tracks_the_fp32_reference or captured_step_equals_the_uncaptured or deterministic_gpu_runs" \
    tests/test_fast_step.py tests/test_captured_phases.py tests/test_determinism.py

# ---------------------------------------------------------------------------------------------- 3, 4 bench
# The headline first: released, fast (captured) and compiled, what capture buys over compiling alone; then the
# extras, whichever of EXTRA_VARIANTS the engine has (the list is data: add a name here and it runs when
# e2e_configs.VARIANTS knows it). Time plan of the two bench parts (caps 240 + 80 s): released ~10 s, fast
# (compile, capture) and compiled (compile again, mostly from Inductor's cache) most of the rest; no-compile
# compiles nothing. A captured row warms up 3 steps, whatever --warmup says (2 uncaptured, 1 capturing).
HEADLINE_VARIANTS="${HEADLINE_VARIANTS:-released,fast,compiled}"
EXTRA_VARIANTS="${EXTRA_VARIANTS:-no-compile}"
if [ "$DRY" = 1 ]; then
    BENCH_SIZE=(--device cpu --smoke --steps 1 --repeats 1 --warmup 0)
else
    BENCH_SIZE=(--device cuda --model preact_resnet18 --batch-size 128 --steps 5 --repeats 3 --warmup 2)
fi
# --time-budget: the engine skips configurations that would not finish, rather than being killed mid-one;
# it is the limit this part really gets (less near the deadline) minus 30 s for start-up and the report.
part headline 240 "$PYTHON" -m rwp_fast.cli bench "${BENCH_SIZE[@]}" --methods at,at-rwp \
    --variants "$HEADLINE_VARIANTS" --no-progress --time-budget $(( $(limit_for 240) - 30 )) --json "$OUT/bench.json"
EXTRAS="$("$PYTHON" -c "import sys; from rwp_fast.bench.e2e_configs import VARIANTS, NOT_IMPLEMENTED
print(','.join(v for v in sys.argv[1].split(',') if v in VARIANTS and v not in NOT_IMPLEMENTED))" "$EXTRA_VARIANTS" 2>/dev/null)"
if [ -n "$EXTRAS" ]; then
    # beside the headline's fast (compiled bodies, captured) and compiled (not captured): the same capture
    # of the eager bodies, which shows what compiling adds once the launches are gone
    part extras 80 "$PYTHON" -m rwp_fast.cli bench "${BENCH_SIZE[@]}" --methods at,at-rwp \
        --variants "$EXTRAS" --no-progress --time-budget $(( $(limit_for 80) - 20 )) --json "$OUT/extras.json"
else
    printf 'extras\tskipped: none of %s is implemented in e2e_configs.VARIANTS\t0\t0\n' "$EXTRA_VARIANTS" >> "$STATUS"
    echo "extras: none of $EXTRA_VARIANTS implemented"
fi

# ---------------------------------------------------------------------------------------------- 5 micro
micro() {
    local op rc=0 flags=(--no-compile) ops=(pgd_step lsc_loss weight_perturb)
    # dry run: one op shows the plumbing works (pytest runs every bench_<op>.py on tiny sizes anyway)
    [ "$DEV" = cpu ] && flags+=(--quick) && ops=(pgd_step)
    for op in "${ops[@]}"; do
        timeout --kill-after=5 "${MICRO_OP_S:-40}" "$PYTHON" -m "rwp_fast.bench.bench_$op" --device "$DEV" \
            --json "$WORK/micro_$op.json" "${flags[@]}" || { rc=$?; echo "micro $op: rc=$rc"; }
    done
    return $rc
}
export -f micro
part micro 130 bash -c micro

# ---------------------------------------------------------------------------------------------- 7 sanitizer
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
part sanitizer 90 bash -c sanitizer

# ---------------------------------------------------------------------------------------------- report
collect
echo
echo "==================== summary ($(( $(date +%s) - T0 ))s) ===================="
cat "$OUT/summary.txt" 2>/dev/null
[ -s "$WORK/collect.err" ] && { echo "collect errors:"; tail -20 "$WORK/collect.err"; }
exit 0
