#!/usr/bin/env bash
# The floor leg of `make test` (issue 28): the lowest torch that setup.py accepts, which is also the GPU
# machine's stack (torch 2.11.0+cu130, triton 3.6.0), in a second environment built from the package
# registry. It runs what differs between torch versions:
#   1 the compiled, captured and equivalence tests, and the library-op tests (opcheck, fullgraph traces);
#   2 a build of the CUDA extension against 2.11's headers, into build/floor-ext (not in place: the checkout's
#     rwp_fast/_C*.so stays the main environment's), then an import of it that registers its ops;
#   3 the device script's dry run, whose headline rows compile the phases on CPU (tests/test_device_run.py).
# numpy<2.4: Triton 3.6's interpreter calls int() on a 1-element array, which numpy 2.4 refuses; with a newer
# numpy the interpreter tests skip with that reason (kernels/_interpreter.py), and this leg would test less.
# Cost on a 2-core machine: README, Tests.
#   usage: bash tests/floor_leg.sh [PYTHON]     (PYTHON: the interpreter that makes the venv; python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
VENV=.venv-floor
BIN="$VENV/bin"
STAMP="$VENV/.rwp-fast-installed"
t0=$(date +%s)
since() { echo "$(( $(date +%s) - t0 ))s"; }

if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
    "$PYTHON" -m venv "$VENV"
    "$BIN/pip" install --quiet "setuptools>=64" wheel torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
    RWP_FAST_SKIP_CUDA_BUILD=1 "$BIN/pip" install --quiet --no-build-isolation -e ".[dev]"
    touch "$STAMP"
fi
"$BIN/python" -c "import torch, triton, numpy; print('floor leg:', 'torch', torch.__version__, 'triton', \
triton.__version__, 'numpy', numpy.__version__)"
echo "floor leg: environment ready ($(since))"

# 1 ------------------------------------------------------------------------------------------- tests
"$BIN/python" -m pytest -q -p no:cacheprovider tests/test_hot_path.py tests/test_captured_phases.py \
    tests/test_phase_compile.py tests/test_fast_step.py tests/test_library_ops.py tests/test_attacks.py
echo "floor leg: tests done ($(since))"

# 2 ------------------------------------------------------------------------------------------- extension
if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || command -v nvcc > /dev/null; then
    # A fresh build-lib: setuptools skips a build whose .so is newer than its sources, even one built against
    # another torch. One architecture: this checks 2.11's headers and ABI, the GPU machine builds its own.
    rm -rf build/floor-ext
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" RWP_FAST_REQUIRE_CUDA_EXT=1 MAX_JOBS="${MAX_JOBS:-2}" \
        RWP_FAST_CUDA_ARCHS=90 "$BIN/python" setup.py -q build_ext --build-lib build/floor-ext --build-temp build/floor-tmp
    "$BIN/python" - <<'EOF'
import glob
import importlib.util

import torch

(path,) = glob.glob("build/floor-ext/rwp_fast/_C*.so")
spec = importlib.util.spec_from_file_location("rwp_fast._C", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
missing = [op for op in ("pgd_step", "pgd_step_", "lsc_loss_fwd", "perturb_axpy_") if not hasattr(torch.ops.rwp_fast, op)]
assert not missing, f"{path} imported but did not register {missing}"
print(f"floor leg: {path} built against torch {torch.__version__} and imported; its ops are registered")
EOF
    echo "floor leg: extension done ($(since))"
else
    echo "floor leg: extension SKIPPED: no nvcc (set CUDA_HOME); the GPU machine builds it at install"
fi

# 3 ------------------------------------------------------------------------------------------- dry run
# the test that runs it: every part ok, the fast rows compiled (aot_eager) with no fullgraph fallback
"$BIN/python" -m pytest -q -p no:cacheprovider tests/test_device_run.py -k dry_run_on_cpu
echo "floor leg: done ($(since))"
