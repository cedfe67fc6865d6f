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
