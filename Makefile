# The two set-up commands of the README, each self-contained on a fresh machine with Python and pip:
#   make demo   the main job: AT, AT-AWP and AT-RWP on the built-in digits data (CPU or GPU)
#   make test   the test suite (what CI runs, through .ci/run)
# Both create .venv on first use: torch first (the extension build imports it), then the package
# in editable mode with the dev extra. The CUDA extension is compiled whenever nvcc is found
# (setup.py looks at CUDA_HOME, /usr/local/cuda and PATH); see setup.py for the knobs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rwp-fast-installed

# 2.11 is the GPU machine's torch and 2.14.1 the CI machine's; setup.py pins the same range.
TORCH_REQ := "torch>=2.11,<2.15" "torchvision>=0.26,<0.30"

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "setuptools>=64" wheel
	$(BIN)/pip install --quiet $(TORCH_REQ)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rwp-fast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests bench

clean:
	rm -rf $(VENV) build *.egg-info rwp_fast/_C*.so
