"""Compile every Triton kernel variant for sm_90 without a GPU (front end + ptxas).

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics but does not type-check like the
compiler: e.g. an ``s = 0`` accumulator where ``s = 0.0`` is needed passes every interpreter test and
fails to compile. This also checks that the launches which must round like torch (NO_FMA) contain no FMA.
"""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("op", ["pgd_step", "lsc_loss", "weight_perturb"])
def test_triton_kernels_compile_for_sm90(require_backend, op):
    require_backend("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rwp_fast.kernels._compile_check", op], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# The detectors of _compile_check, on PTX lines as Triton 3.6/3.8 emit them for sm_90. These need no
# compiler, so they run everywhere (also with a GPU, where the subprocess test above is skipped).
def _variant(**kw):
    from rwp_fast.kernels._compile_check import Variant
    return Variant(kernel=None, signature={}, constexprs={}, options={}, **kw)


@pytest.mark.parametrize("line,rounding,flagged", [
    ("div.full.f32 %f3, %f1, %f2;", "ieee", True),
    ("div.rn.f32 %f3, %f1, %f2;", "ieee", False),
    ("sqrt.approx.ftz.f32 %f2, %f1;", "ieee", True),
    ("sqrt.rn.f32 %f2, %f1;", "ieee", False),
    ("ex2.approx.f32 %f2, %f1;", "ieee", True),
    ("ex2.approx.f32 %f2, %f1;", "lsc", False),
    ("div.full.f32 %f3, %f1, %f2;", "lsc", True),
    ("rcp.approx.ftz.f32 %f2, %f1;", "lsc", True),
    ("min.f32 %f3, %f1, %f2;", "ieee", True),
    ("max.ftz.f32 %f3, %f1, %f2;", "ieee", True),
    ("min.NaN.f32 %f3, %f1, %f2;", "ieee", False),
    ("max.NaN.f32 %f3, %f1, %f2;", "ieee", False),
])
def test_rounding_detector(line, rounding, flagged):
    from rwp_fast.kernels._compile_check import ptx_findings
    assert bool(ptx_findings(_variant(rounding=rounding), line)) == flagged


def test_vector_load_detector():
    from rwp_fast.kernels._compile_check import MAX_SCALAR_LOADS, ptx_findings
    v = _variant(streams=2)
    vec = "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
    scalar = "@%p1 ld.global.b32 { %r5 }, [ %rd2 + 0 ];\n"
    assert ptx_findings(v, vec * 2 + scalar * MAX_SCALAR_LOADS) == []
    assert ptx_findings(v, vec) != []  # one vector load for two streamed operands
    assert ptx_findings(v, vec * 2 + scalar * (MAX_SCALAR_LOADS + 1)) != []
    assert ptx_findings(_variant(no_fma=True), "fma.rn.f32 %f4, %f1, %f2, %f3;") != []


def test_fp32_tests_run_without_tf32():
    """tests/conftest.py switches TF32 off for every test, so GPU tests that claim fp32 equality with the
    reference really compute in fp32 (cuDNN's default on Hopper is TF32 for fp32 convolutions)."""
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
