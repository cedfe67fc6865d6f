"""Shared test setup: Triton interpreter on CPU, per-test seeding, the `gpu` marker, backend fixtures.

Without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` (fp32 only: the interpreter has no
bf16). The variable must be set before any kernel module is imported, because ``@triton.jit`` reads it
when the decorator runs; this file is imported by pytest before any test module.
"""

import importlib
import os
import random
import re
import zlib

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

DEVICE = torch.device("cuda" if CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch, random and numpy per test, from the test id: reproducible, but every
    parametrization draws different inputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI's smoke modes call torch.set_num_threads(1) for the process; in-process CLI tests must not
    hand that to later tests (it changes summation orders, which the equivalence tests compare)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 in every test: the GPU tests compare fp32 results with the reference at fp32
    tolerances, and on Ampere/Hopper cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa,
    ~1e-3 relative), which no such tolerance survives. Restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Make the Triton host functions allocate NaN-filled outputs, so unwritten elements fail tests."""
    try:
        common = importlib.import_module("rwp_fast.kernels._common")
    except ImportError:
        return
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _backend_available(name):
    """None if `name` can run on DEVICE, else the reason to skip."""
    if name == "torch":
        return None
    if name == "cuda" and not CUDA:
        return "needs CUDA"
    module = "rwp_fast.ops.cuda_ops" if name == "cuda" else "rwp_fast.kernels.pgd_step"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{name} backend not importable: {exc}"
    if name == "triton":  # on CPU: the interpreter, where it runs our kernels (kernels/_interpreter.py)
        from rwp_fast.ops import dispatch
        return dispatch.triton_cpu_refusal(DEVICE.type)
    return None


BACKENDS = ["torch", "triton"] + (["cuda"] if CUDA else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that can run on DEVICE (on CPU: torch and the Triton interpreter)."""
    reason = _backend_available(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=[b for b in BACKENDS if b != "torch"])
def kernel_backend(request):
    """The backends with host-side argument validation (triton, cuda): the torch one is the reference."""
    reason = _backend_available(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def require_backend():
    """require_backend(name): skip the calling test unless backend `name` can run on DEVICE."""
    def require(name):
        reason = _backend_available(name)
        if reason:
            pytest.skip(reason)
        return name
    return require


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def arg_error(kernel_backend):
    """arg_error(TypeError, 'grad') → a pytest.raises context that also checks the message names the
    argument. The Triton host functions raise exactly ValueError/TypeError; the CUDA extension's
    TORCH_CHECK may surface as RuntimeError, so for it any of the three is accepted."""
    def check(exc_type, arg_name):
        types = exc_type if kernel_backend == "triton" else (TypeError, ValueError, RuntimeError)
        return pytest.raises(types, match=re.escape(arg_name))
    return check
