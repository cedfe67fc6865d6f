"""The CUDA extension ``rwp_fast._C`` (csrc/) and its wrapper ``rwp_fast.ops.cuda_ops``.

These parts run on CPU, in CI:
  * the extension was built and imports wherever nvcc is present, so a silently skipped build fails;
  * the op schemas;
  * the fake (meta) implementations, under FakeTensorMode and under torch.compile(fullgraph=True);
  * the argument checks, through the CPU registration.

These parts need CUDA (@pytest.mark.gpu):
  * what only the extension does: noise in the inputs' dtype;
  * torch.compile through the real kernels;
  * a compute-sanitizer memcheck run of bench/sanitize_cuda_ops.py.

The kernels themselves are checked against rwp_fast.reference, with the argument checks, on every backend
(the `backend` fixture includes 'cuda' where there is a GPU): test_pgd_step.py, test_lsc_loss.py,
test_weight_perturb.py, test_zero_direction.py, test_unaligned_inputs.py.
"""

import importlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwp_fast.ops.weight_perturb import SegmentTable
from rwp_fast.reference.pgd_step import pgd_random_init_ref

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALPHA_LINF, EPS_LINF = 2 / 255, 8 / 255
EPS_L2 = 128 / 255
TRADES_BETA = 6.0


def gpu(fn):
    """@pytest.mark.gpu, plus a skipif of its own in case conftest's hook is not loaded."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(fn))


@pytest.fixture(scope="module")
def cuda_ops():
    """The cuda backend module. The test is skipped when the extension was not built;
    test_extension_is_built_when_nvcc_is_present is the one that fails in that case."""
    try:
        return importlib.import_module("rwp_fast.ops.cuda_ops")
    except ImportError as exc:
        pytest.skip(f"rwp_fast._C is not built: {exc}")


# ============================================================================= build and registration
def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for path in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if path and os.path.exists(path):
            return path
    return None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc: setup.py installs without the extension")
@pytest.mark.skipif(os.environ.get("RWP_FAST_SKIP_CUDA_BUILD") == "1",
                    reason="RWP_FAST_SKIP_CUDA_BUILD=1 skips the extension on purpose")
def test_extension_is_built_when_nvcc_is_present():
    """setup.py only warns when it skips the extension, so this test is what catches a lost build."""
    try:
        importlib.import_module("rwp_fast._C")
        importlib.import_module("rwp_fast.ops.cuda_ops")
    except ImportError as exc:
        pytest.fail(f"nvcc is at {_nvcc()} but rwp_fast._C does not import ({exc}). Build it with "
                    "`CUDA_HOME=/usr/local/cuda pip install -e . --no-build-isolation`, or set "
                    "RWP_FAST_SKIP_CUDA_BUILD=1 to run without it.")


def _built_extension():
    return sorted((ROOT / "rwp_fast").glob("_C*.so"))


def _cuobjdump():
    import triton  # Triton bundles cuobjdump; a toolkit's works the same
    for path in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump",
                 Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"):
        if path.exists():
            return str(path)
    return None


# The streaming kernels of csrc/ (one instance per storage type and vector width): each must have an
# instance with 16-byte loads. lsc_loss reads rows of C logits and is not bandwidth-bound.
STREAMING_KERNELS = ("pgd_step_linf_kernel", "pgd_step_l2_kernel", "random_init_linf_kernel",
                     "random_init_l2_kernel", "chunk_sq_kernel", "perturb_axpy_kernel")
CUDA_MAX_REGS = 64  # measured 13-47 on sm_90 with nvcc 13.0 (2026-11-29)


def test_cuda_kernels_vectorize_and_do_not_spill_on_sm90():
    """Machine-code proof from the built .so's sm_90 SASS (setup.py compiles 80;90 by default, so no
    extra nvcc run is needed): every kernel uses ≤ CUDA_MAX_REGS registers with 0 bytes of stack or
    local memory (no spills), and every streaming kernel, for every storage type, has an LDG.E.128
    vector path."""
    sos, cuobjdump = _built_extension(), None
    if not sos:
        pytest.skip("rwp_fast._C is not built (test_extension_is_built_when_nvcc_is_present covers that)")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither triton's bundled one nor $CUDA_HOME/bin)")
    run = lambda *a: subprocess.run([cuobjdump, *a, "-arch", "sm_90", str(sos[0])], capture_output=True,
                                    text=True, check=True, timeout=120).stdout
    usage = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                       run("--dump-resource-usage"))
    assert len(usage) >= 40, "no sm_90 code in the extension: build with RWP_FAST_CUDA_ARCHS including 90"
    bad = [(f, r, st, lo) for f, r, st, lo in usage if int(r) > CUDA_MAX_REGS or int(st) or int(lo)]
    assert not bad, f"registers > {CUDA_MAX_REGS} or stack/local memory (spills): {bad}"
    vector = {}  # (kernel, storage type) -> has an LDG.E.128
    for function in run("--dump-sass").split("Function : ")[1:]:
        name = function.split(None, 1)[0]
        kernel = next((k for k in STREAMING_KERNELS if k in name), None)
        dtype = re.search(r"I(f|6__half|13__nv_bfloat16)", name)
        if kernel and dtype:
            key = (kernel, dtype.group(1))
            vector[key] = vector.get(key, False) or "LDG.E.128" in function
    expected = {(k, d) for k in STREAMING_KERNELS for d in ("f", "6__half", "13__nv_bfloat16")}
    assert set(vector) == expected
    assert all(vector.values()), f"no LDG.E.128 in {[k for k, v in vector.items() if not v]}"


SCHEMAS = {
    "pgd_step": "rwp_fast::pgd_step(Tensor x_adv, Tensor grad, Tensor x_nat, float alpha, float eps, "
                "str norm, Tensor(a!) out) -> ()",
    "pgd_step_": "rwp_fast::pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, float alpha, float eps, "
                 "str norm) -> ()",
    "pgd_random_init": "rwp_fast::pgd_random_init(Tensor x_nat, Tensor noise, float eps, str norm, "
                       "Tensor? radius, Tensor(a!) out) -> ()",
    "lsc_loss_fwd": "rwp_fast::lsc_loss_fwd(Tensor logits, Tensor target, float p, float q) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "lsc_loss_bwd": "rwp_fast::lsc_loss_bwd(Tensor grad_out, Tensor logits, Tensor target, Tensor lse, "
                    "Tensor mask) -> Tensor",
    "lsc_loss_trades_fwd": "rwp_fast::lsc_loss_trades_fwd(Tensor logits_nat, Tensor logits_adv, "
                           "Tensor target, float beta, float p, float q) "
                           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "lsc_loss_trades_bwd": "rwp_fast::lsc_loss_trades_bwd(Tensor grad_out, Tensor logits_nat, "
                           "Tensor logits_adv, Tensor target, Tensor lse_nat, Tensor lse_adv, Tensor kl, "
                           "Tensor mask, float beta) -> (Tensor, Tensor)",
    "segment_sq_norm": "rwp_fast::segment_sq_norm(Tensor x, Tensor offsets, Tensor chunk_seg, "
                       "Tensor chunk_start, Tensor seg_chunk_start, int chunk) -> Tensor",
    "accumulate_sq_norm_": "rwp_fast::accumulate_sq_norm_(Tensor(a!) a, Tensor g, Tensor? beta, "
                           "Tensor offsets, Tensor chunk_seg, Tensor chunk_start, Tensor seg_chunk_start, "
                           "int chunk) -> Tensor",
    "perturb_axpy_": "rwp_fast::perturb_axpy_(Tensor(a!) w, Tensor a, Tensor scale, Tensor offsets, "
                     "Tensor chunk_seg, Tensor chunk_start, Tensor seg_chunk_start, int chunk, "
                     "int sign) -> ()",
}
MUTATED = {"pgd_step": "out", "pgd_step_": "x_adv", "pgd_random_init": "out", "accumulate_sq_norm_": "a",
           "perturb_axpy_": "w"}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_is_registered_with_its_schema(cuda_ops, name):
    schema = getattr(torch.ops.rwp_fast, name).default._schema
    assert str(schema) == SCHEMAS[name]
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ([MUTATED[name]] if name in MUTATED else [])


def test_backend_module_has_the_triton_contract(cuda_ops):
    """rwp_fast.ops calls this module and the Triton modules by the same names."""
    for name in ("pgd_step", "pgd_step_", "pgd_random_init", "lsc_loss_fwd", "lsc_loss_bwd", "lsc_loss_trades_fwd",
                 "lsc_loss_trades_bwd", "segment_sq_norm", "accumulate_sq_norm_", "perturb_axpy_"):
        assert callable(getattr(cuda_ops, name))


# ============================================================================= fake / meta (CPU)
META = torch.device("meta")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_pgd_ops_return_out(cuda_ops, dtype):
    x = torch.empty(7, 3, 5, 5, device=META, dtype=dtype)
    out = torch.empty_like(x)
    assert cuda_ops.pgd_step(x, torch.empty_like(x), torch.empty_like(x), 0.1, 0.2, "l2", out) is out
    radius = torch.empty(7, device=META)
    assert cuda_ops.pgd_random_init(x, torch.empty(x.shape, device=META), 0.2, "l2", radius, out) is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", [(1, 10), (129, 1000)])
def test_fake_lsc_ops_shapes_and_dtypes(cuda_ops, dtype, batch, classes):
    logits = torch.empty(batch, classes, device=META, dtype=dtype)
    target = torch.empty(batch, device=META, dtype=torch.long)
    f32, b = torch.float32, (batch,)
    outs = cuda_ops.lsc_loss_fwd(logits, target, 0.0, math.inf)
    mask, lse = outs[1], outs[4]
    assert [(t.shape, t.dtype) for t in outs] == \
        [(b, f32), (b, torch.bool), ((1,), torch.int64), ((1,), f32), (b, f32)]
    grad_out = torch.empty((), device=META)
    d = cuda_ops.lsc_loss_bwd(grad_out, logits, target, lse, mask)
    assert (d.shape, d.dtype) == (logits.shape, dtype)
    out = cuda_ops.lsc_loss_trades_fwd(logits, torch.empty_like(logits), target, TRADES_BETA, 0.0, 1.7)
    assert [(t.shape, t.dtype) for t in out] == \
        [(b, f32), (b, torch.bool), ((1,), torch.int64), ((1,), f32), (b, f32), (b, f32), (b, f32)]
    d_nat, d_adv = cuda_ops.lsc_loss_trades_bwd(grad_out, logits, logits, target, *out[4:], out[1], TRADES_BETA)
    assert (d_nat.shape, d_nat.dtype, d_adv.shape, d_adv.dtype) == (logits.shape, dtype, logits.shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_weight_ops_shapes_and_dtypes(cuda_ops, dtype):
    table = SegmentTable.from_numels([1, 37, 4101], 4096).to(META)
    w = torch.empty(table.numel, device=META, dtype=dtype)
    sq = cuda_ops.segment_sq_norm(w, table)
    assert (sq.shape, sq.dtype) == ((3,), torch.float32)
    sq = cuda_ops.accumulate_sq_norm_(w, torch.empty_like(w), table, torch.empty(3, device=META))
    assert (sq.shape, sq.dtype) == ((3,), torch.float32)
    assert cuda_ops.perturb_axpy_(w, torch.empty_like(w), sq, table, -1) is w


def test_fake_tensor_mode_traces_every_op(cuda_ops):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(5, 100, dtype=torch.float16)
        target = torch.empty(5, dtype=torch.long)
        out = cuda_ops.lsc_loss_trades_fwd(logits, logits.clone(), target, TRADES_BETA, 0.0, 1.7)
        assert [t.shape for t in out] == [(5,), (5,), (1,), (1,), (5,), (5,), (5,)]
        x = torch.empty(4, 3, 8, 8)
        assert cuda_ops.pgd_step(x, x.clone(), x.clone(), 0.1, 0.1, "linf", x).shape == x.shape


def test_compile_fullgraph_over_meta_tensors(cuda_ops):
    """torch.compile(fullgraph=True) traces the custom ops with their fake implementations, with no
    graph break. That includes the auto-functionalization of the in-place ops. aot_eager then runs
    the graph on meta tensors, so this needs no GPU."""
    table = SegmentTable.from_numels([5, 1, 9000], 4096).to(META)

    def step(x_adv, grad, x_nat, logits, target, w, a, g):
        cuda_ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", x_adv)  # in place
        _loss, mask, count, masked_mean, lse = cuda_ops.lsc_loss_fwd(logits, target, 0.0, 1.7)
        dlogits = cuda_ops.lsc_loss_bwd(masked_mean.view(()), logits, target, lse, mask)
        a_sq = cuda_ops.accumulate_sq_norm_(a, g, table, None)
        cuda_ops.perturb_axpy_(w, a, cuda_ops.segment_sq_norm(w, table) / a_sq, table, 1)
        return x_adv * 1, dlogits, count, w

    torch._dynamo.reset()
    x = torch.empty(7, 3, 4, 4, device=META)
    logits = torch.empty(7, 10, device=META)
    target = torch.empty(7, device=META, dtype=torch.long)
    w = torch.empty(table.numel, device=META)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(
        x, x.clone(), x.clone(), logits, target, w, w.clone(), w.clone())
    assert [t.shape for t in out] == [x.shape, logits.shape, (1,), w.shape]


def _opcheck_cases():
    """(op name, args) on meta tensors for every op of rwp_fast._C."""
    x = torch.empty(7, 3, 4, 4, device=META)
    logits = torch.empty(7, 10, device=META)
    target = torch.empty(7, device=META, dtype=torch.long)
    rows = torch.empty(7, device=META)
    mask = torch.empty(7, device=META, dtype=torch.bool)
    grad_out = torch.empty((), device=META)
    t = SegmentTable.from_numels([5, 1, 9000], 4096).to(META)
    table = (t.offsets, t.chunk_seg, t.chunk_start, t.seg_chunk_start, t.chunk)
    w = torch.empty(t.numel, device=META)
    per_seg = torch.empty(t.num_segments, device=META)
    e = lambda: torch.empty_like(x)
    return {
        "pgd_step": (e(), e(), e(), 0.1, 0.2, "l2", e()),
        "pgd_step_": (e(), e(), e(), 0.1, 0.2, "linf"),
        "pgd_random_init": (e(), e(), 0.2, "l2", rows.clone(), e()),
        "lsc_loss_fwd": (logits, target, 0.0, 1.7),
        "lsc_loss_bwd": (grad_out, logits, target, rows, mask),
        "lsc_loss_trades_fwd": (logits, logits.clone(), target, TRADES_BETA, 0.0, 1.7),
        "lsc_loss_trades_bwd": (grad_out, logits, logits.clone(), target, rows, rows.clone(), rows.clone(), mask,
                                TRADES_BETA),
        "segment_sq_norm": (w, *table),
        "accumulate_sq_norm_": (w, w.clone(), per_seg, *table),
        "perturb_axpy_": (w, w.clone(), per_seg, *table, -1),
    }


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_opcheck_on_meta_tensors(cuda_ops, name):
    """torch.library.opcheck on every op, on meta tensors (the ops have no CPU kernel, and the CPU
    registration only rejects CPU tensors): the schema (mutations and aliasing declared), the autograd
    registration, the fake impl under FakeTensorMode, and AOT dispatch with dynamic shapes
    (functionalization of the Tensor(a!) arguments)."""
    args = _opcheck_cases()[name]
    op = getattr(torch.ops.rwp_fast, name).default
    op(*args)  # the fake impl runs as the Meta kernel; without one this raises NotImplementedError
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_loading_the_extension_alone_registers_the_fakes():
    """`import rwp_fast._C` (not rwp_fast.ops.cuda_ops) must be enough to trace the ops with fake
    tensors: the .so imports rwp_fast.ops.fake_impls when it loads."""
    if not _built_extension():
        pytest.skip("rwp_fast._C is not built")
    code = ("import sys, torch, rwp_fast._C\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "assert 'rwp_fast.ops.cuda_ops' not in sys.modules\n"
            "with FakeTensorMode():\n"
            "    out = torch.ops.rwp_fast.lsc_loss_fwd(torch.empty(3, 10), torch.empty(3, dtype=torch.long), 0., 1.)\n"
            "print([tuple(t.shape) for t in out])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[(3,), (3,), (1,), (1,), (3,)]"


def test_cpu_tensors_get_a_message_naming_the_argument(cuda_ops):
    """The ops are also registered for CPU, only to fail with a message that names the argument.
    Without that, the dispatcher's generic "Could not run ... 'CPU' backend" would be the error."""
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=re.escape("pgd_step: x_adv must be a CUDA tensor, got device cpu")):
        cuda_ops.pgd_step(x, x, x, 0.1, 0.1, "linf", x.clone())
    with pytest.raises(RuntimeError, match=re.escape("pgd_step_: x_adv must be a CUDA tensor, got device cpu")):
        cuda_ops.pgd_step_(x, x, x, 0.1, 0.1, "linf")
    with pytest.raises(RuntimeError, match=re.escape("lsc_loss_fwd: logits must be a CUDA tensor")):
        cuda_ops.lsc_loss_fwd(x, torch.zeros(2, dtype=torch.long), 0.0, 1.0)
    table = SegmentTable.from_numels([2, 4], 4)
    with pytest.raises(RuntimeError, match=re.escape("segment_sq_norm: x must be a CUDA tensor")):
        cuda_ops.segment_sq_norm(torch.zeros(6), table)


# ============================================================================= GPU
# The kernels against rwp_fast.reference (odd sizes, fp16/bf16, NaN-poisoned outputs, unaligned inputs) and
# the argument checks are tested on every backend, cuda included, in test_pgd_step.py, test_lsc_loss.py,
# test_weight_perturb.py and test_unaligned_inputs.py. What is left here is the extension's own.
def _pgd_inputs(shape, dtype=torch.float32):
    """x_nat in [0, 1]; x_adv up to 1.5·ε away, so the projection clips; grad with exact zeros."""
    x_nat = torch.rand(shape, device="cuda")
    x_adv = (x_nat + (torch.rand(shape, device="cuda") * 3 - 1.5) * EPS_LINF).clamp(0, 1)
    grad = torch.randn(shape, device="cuda")
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_init_takes_noise_in_the_inputs_dtype(cuda_ops, dtype):
    """The extension also reads noise stored in x_nat's dtype (the Triton backend and rwp_fast.ops take fp32
    noise only): the same result as the reference on that noise, bit-exact for L∞."""
    shape = (7, 3, 32, 32)
    x_nat = torch.rand(shape, device="cuda").to(dtype)
    uniform = (torch.rand(shape, device="cuda") * 2 - 1).to(dtype)
    out = torch.full_like(x_nat, math.nan)
    cuda_ops.pgd_random_init(x_nat, uniform, EPS_LINF, "linf", None, out)
    assert torch.equal(out, pgd_random_init_ref(x_nat, uniform, EPS_LINF, "linf"))
    gauss, radius = torch.randn(shape, device="cuda").to(dtype), torch.rand(shape[0], device="cuda")
    out = torch.full_like(x_nat, math.nan)
    cuda_ops.pgd_random_init(x_nat, gauss, EPS_L2, "l2", radius, out)
    # one ulp of the dtype: the norm's fp32 sum in another order may round the output the other way
    torch.testing.assert_close(out, pgd_random_init_ref(x_nat, gauss, EPS_L2, "l2", radius), rtol=0,
                               atol=torch.finfo(dtype).eps)


@gpu
def test_compile_fullgraph_runs_the_kernels(cuda_ops):
    """torch.compile(fullgraph=True) with Inductor: no graph break around the custom ops, and the
    compiled graph gives the eager results, including the in-place step written back."""
    x_adv, grad, x_nat = _pgd_inputs((7, 3, 32, 32))
    logits = torch.randn(7, 100, device="cuda")
    target = torch.randint(0, 100, (7,), device="cuda")

    def step(x_adv, grad, x_nat, logits, target):
        cuda_ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", x_adv)
        loss, _mask, count, masked_mean, _lse = cuda_ops.lsc_loss_fwd(logits, target, 0.0, 1.7)
        return loss, count, masked_mean * 2

    torch._dynamo.reset()
    eager_x, compiled_x = x_adv.clone(), x_adv.clone()
    expected = step(eager_x, grad, x_nat, logits, target)
    got = torch.compile(step, fullgraph=True)(compiled_x, grad, x_nat, logits, target)
    assert torch.equal(compiled_x, eager_x)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])  # a fixed-order sum: the same bits in and out of a graph


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(cuda_home, "bin", "compute-sanitizer")
    return path if os.path.exists(path) else None


@gpu
def test_compute_sanitizer_memcheck_is_clean(cuda_ops):
    exe = _compute_sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH (nor in $CUDA_HOME/bin)")
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
           str(ROOT / "bench" / "sanitize_cuda_ops.py")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
