#!/usr/bin/env bash
# One-shot GPU check of the fused ops: install, GPU tests, microbenchmarks. Target: ≤ 8 minutes on an
# H100 (extension build ~2-3 min, tests ~2 min, benchmarks ~3 min).
#
#   OUT=/some/dir bash bench/device_run.sh
#
# Writes under $OUT (default ./out): install.log, tests_gpu.log, tests_ops.log, bench_<op>.log and
# bench_<op>.json (one row per case × implementation, with the GPU name, versions, date, commit and
# command), and summary.txt. Every step runs even if an earlier one failed; the summary says which
# failed. Knobs: RWP_FAST_CUDA_ARCHS (default 90 here: H100/H200 only, halves the build), MAX_JOBS,
# RWP_BENCH_NO_COMPILE=1 (skip the torch.compile baselines, ~1-2 min of compilation), PYTHON.
set -u

OUT="${OUT:-./out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export RWP_FAST_CUDA_ARCHS="${RWP_FAST_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-16}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, output to $OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t ))
    if [ $rc -eq 0 ]; then
        echo "$name: ok (${took}s)" | tee -a "$SUMMARY"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: TIMED OUT after ${took}s, see $name.log" | tee -a "$SUMMARY"
    else
        echo "$name: FAILED rc=$rc (${took}s), see $name.log" | tee -a "$SUMMARY"
    fi
    return $rc
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
    "$PYTHON" -c "import pytest, pytest_benchmark; print('pytest', pytest.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# 1. Install in editable mode (maps kernels/ to rwp_fast.kernels and builds rwp_fast._C when nvcc is
#    there). No deps: the machine is offline and already has torch/triton. If the extension build fails,
#    install without it so the Triton backend is still checked.
if ! step install 360 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
    RWP_FAST_SKIP_CUDA_BUILD=1 step install_without_cuda_ext 120 \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
fi
if ! "$PYTHON" -c "import rwp_fast.kernels.pgd_step" > /dev/null 2>&1; then
    # Last resort: a package tree of symlinks that puts kernels/ at rwp_fast/kernels.
    SHIM="$OUT/.shim"
    rm -rf "$SHIM" && mkdir -p "$SHIM/rwp_fast"
    for entry in rwp_fast/*; do ln -s "$PWD/$entry" "$SHIM/rwp_fast/"; done
    ln -s "$PWD/kernels" "$SHIM/rwp_fast/kernels"
    export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: using the symlink shim $SHIM on PYTHONPATH" | tee -a "$SUMMARY"
fi
"$PYTHON" -c "import rwp_fast.ops.cuda_ops" > "$OUT/cuda_ops_import.log" 2>&1 \
    && echo "cuda backend: importable" | tee -a "$SUMMARY" \
    || echo "cuda backend: NOT importable ($(tail -1 "$OUT/cuda_ops_import.log"))" | tee -a "$SUMMARY"

# 2. Tests. The gpu-marked tests of the whole suite (fp16/bf16, CUDA-only), then the three op test files
#    in full: on a GPU they run the compiled Triton kernels (and the cuda backend) in fp32, where the
#    L∞ step and the axpy must stay bit-exact.
step tests_gpu 200 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
step tests_ops 200 "$PYTHON" -m pytest -q -m "not gpu" -p no:cacheprovider \
    tests/test_pgd_step.py tests/test_lsc_loss.py tests/test_weight_perturb.py

# 3. Microbenchmarks: JSON rows under $OUT (the lead copies them to bench/results/).
COMPILE_FLAG=()
[ "${RWP_BENCH_NO_COMPILE:-0}" = "1" ] && COMPILE_FLAG=(--no-compile)
for op in pgd_step lsc_loss weight_perturb; do
    step "bench_$op" 200 "$PYTHON" -m "bench.bench_$op" --device cuda --json "$OUT/bench_$op.json" \
        ${COMPILE_FLAG[@]+"${COMPILE_FLAG[@]}"}
done

# ==================== end-to-end throughput (issue 7: bench/bench_e2e.py) ====================
# `python -m bench --plan device`: images/s of full training steps, most important first: PreAct ResNet-18
# b128 released + fast (the 6x and AT-RWP/AT <= 2.4 targets), WRN-34-10 b128 and PreAct-18 b512 fast +
# released, then reference and the ablations of PreAct-18 b128. It gets what is left of a 9-minute whole
# (RWP_E2E_TOTAL_S, default 540) after the parts above, minus 30 s for the report, capped at
# RWP_E2E_LIMIT_S (default 300). The suite starts no new configuration in its last 20 s and rewrites
# $OUT/e2e.json after each one, so a timeout keeps what was measured (missing rows say "skipped").
# RWP_E2E=0 skips this part; RWP_E2E_ARGS adds flags (e.g. "--variants reference,no-amp" for a second
# run of what the first one had no time for). The table is printed last, below.
if [ "${RWP_E2E:-1}" != "0" ]; then
    E2E_LEFT=$(( ${RWP_E2E_TOTAL_S:-540} - ($(date +%s) - T0) - 30 ))
    E2E_LIMIT=${RWP_E2E_LIMIT_S:-300}
    [ "$E2E_LEFT" -lt "$E2E_LIMIT" ] && E2E_LIMIT=$E2E_LEFT
    if [ "$E2E_LIMIT" -ge 90 ]; then
        step e2e "$E2E_LIMIT" "$PYTHON" -m bench --device cuda --plan device --steps 3 --repeats 3 \
            --warmup 2 --time-budget $(( E2E_LIMIT - 20 )) --json "$OUT/e2e.json" ${RWP_E2E_ARGS:-}
    else
        echo "e2e: SKIPPED, ${E2E_LEFT}s left of ${RWP_E2E_TOTAL_S:-540}s; run it alone with" \
             "RWP_E2E_TOTAL_S=9999 or: python -m bench --device cuda --plan device" | tee -a "$SUMMARY"
    fi
fi
# ==================== end of the end-to-end section ====================

# 4. Short report, last: step outcomes, test summaries, benchmark tables.
echo
echo "==================== summary ($(( $(date +%s) - T0 ))s) ===================="
cat "$SUMMARY"
for log in tests_gpu tests_ops; do
    [ -f "$OUT/$log.log" ] && echo "$log: $(grep -E '(passed|failed|error|skipped)' "$OUT/$log.log" | tail -1)"
done
"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys
sys.path.insert(0, os.getcwd())
from bench import common
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    with open(path) as f:
        rows += json.load(f)
if rows:
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, "
          f"copy ceiling {rows[0]['copy_gbps'] or 0:.0f} GB/s")
    common.print_table(rows)
EOF
# ==================== end-to-end table, last (issue 7) ====================
if [ -f "$OUT/e2e.json" ]; then
    echo
    echo "==================== end-to-end throughput (e2e.json; progress in e2e.log) ===================="
    "$PYTHON" -m bench --table-from "$OUT/e2e.json" 2>&1 || echo "e2e: could not print the table, see e2e.log"
fi
