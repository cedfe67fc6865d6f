# The two set-up commands of the README, each self-contained on a fresh machine with Python and pip:
#   make demo   the main job: AT, AT-AWP and AT-RWP on the built-in digits data (CPU or GPU)
#   make test   the test suite, then its portability leg (what CI runs, through .ci/run)
# Both create .venv on first use: torch first (the extension build imports it), then the package
# in editable mode with the dev extra. The CUDA extension is compiled whenever nvcc is found
# (setup.py looks at CUDA_HOME, /usr/local/cuda and PATH); see setup.py for the knobs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rwp-fast-installed

# 2.11 is the GPU machine's torch and 2.14.1 the CI machine's; setup.py pins the same range.
TORCH_REQ := "torch>=2.11,<2.15" "torchvision>=0.26,<0.30"

.PHONY: demo test test-floor install clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "setuptools>=64" wheel
	$(BIN)/pip install --quiet $(TORCH_REQ)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rwp-fast demo

# The portability leg (issue 20): the equivalence and op tests once more under each setting below, each of
# which changes how fp32 rounds on CPU (the ISA ATen and oneDNN dispatch to, MKL's kernels, the thread count
# and so the summation order). The fp64 equivalence tests and the per-op error models must pass under all
# of them, on an AVX2 machine and on an AVX-512 one alike. Cost: README, Tests.
PORTABLE_TESTS := tests/test_fast_step.py tests/test_captured_phases.py tests/test_lsc_loss.py tests/test_pgd_step.py \
	tests/test_weight_perturb.py tests/test_zero_direction.py tests/test_reference.py \
	tests/test_bench_e2e.py::test_released_step_matches_reference_step tests/test_verify.py::test_whole_step_check \
	tests/test_unaligned_inputs.py tests/test_hot_path.py::test_compiled_phases_equal_the_reference_in_fp64
PORTABILITY_ENVS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	OMP_NUM_THREADS=1 OMP_NUM_THREADS=3

test: $(STAMP)
	$(BIN)/python -m pytest -q tests bench
	@for setting in $(PORTABILITY_ENVS); do \
		echo "portability leg: $$setting"; \
		env $$setting $(BIN)/python -m pytest -q -p no:cacheprovider $(PORTABLE_TESTS) || exit 1; \
	done
	$(MAKE) test-floor

# The floor leg (issue 28): torch 2.11.0 + triton 3.6.0, the lowest torch setup.py accepts and the GPU
# machine's, in .venv-floor: the compiled/captured/equivalence and library-op tests, the CUDA extension
# built against 2.11 and imported, the device script's dry run. tests/floor_leg.sh says what and why.
test-floor:
	bash tests/floor_leg.sh $(PYTHON)

clean:
	rm -rf $(VENV) .venv-floor build *.egg-info rwp_fast/_C*.so
