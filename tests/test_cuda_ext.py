"""The CUDA extension ``rwp_fast._C`` (csrc/) and its wrapper ``rwp_fast.ops.cuda_ops``.

These parts run on CPU, in CI:
  * the extension was built and imports wherever nvcc is present, so a silently skipped build fails;
  * the op schemas;
  * the fake (meta) implementations, under FakeTensorMode and under torch.compile(fullgraph=True);
  * the argument checks, through the CPU registration.

These parts need CUDA (@pytest.mark.gpu):
  * every kernel against rwp_fast.reference, at odd sizes, with NaN-poisoned outputs;
  * the TORCH_CHECK messages;
  * torch.compile through the real kernels;
  * a compute-sanitizer memcheck run of bench/sanitize_cuda_ops.py.
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
from rwp_fast.reference.lsc_loss import lsc_loss_ref, lsc_loss_trades_ref
from rwp_fast.reference.pgd_step import pgd_random_init_ref, pgd_step_ref
from rwp_fast.reference.weight_perturb import accumulate_sq_norm_ref, perturb_axpy_ref, segment_sq_norm_ref

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALPHA_LINF, EPS_LINF = 2 / 255, 8 / 255
ALPHA_L2, EPS_L2 = 15 / 255, 128 / 255
TRADES_BETA = 6.0


def gpu(fn):
    """@pytest.mark.gpu, plus a skipif of its own in case conftest's hook is not loaded."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(fn))


@pytest.fixture(scope="module")
def c():
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
def test_op_is_registered_with_its_schema(c, name):
    schema = getattr(torch.ops.rwp_fast, name).default._schema
    assert str(schema) == SCHEMAS[name]
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ([MUTATED[name]] if name in MUTATED else [])


def test_backend_module_has_the_triton_contract(c):
    """rwp_fast.ops calls this module and the Triton modules by the same names."""
    for name in ("pgd_step", "pgd_step_", "pgd_random_init", "lsc_loss_fwd", "lsc_loss_bwd", "lsc_loss_trades_fwd",
                 "lsc_loss_trades_bwd", "segment_sq_norm", "accumulate_sq_norm_", "perturb_axpy_"):
        assert callable(getattr(c, name))


# ============================================================================= fake / meta (CPU)
META = torch.device("meta")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_pgd_ops_return_out(c, dtype):
    x = torch.empty(7, 3, 5, 5, device=META, dtype=dtype)
    out = torch.empty_like(x)
    assert c.pgd_step(x, torch.empty_like(x), torch.empty_like(x), 0.1, 0.2, "l2", out) is out
    radius = torch.empty(7, device=META)
    assert c.pgd_random_init(x, torch.empty(x.shape, device=META), 0.2, "l2", radius, out) is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", [(1, 10), (129, 1000)])
def test_fake_lsc_ops_shapes_and_dtypes(c, dtype, batch, classes):
    logits = torch.empty(batch, classes, device=META, dtype=dtype)
    target = torch.empty(batch, device=META, dtype=torch.long)
    f32, b = torch.float32, (batch,)
    outs = c.lsc_loss_fwd(logits, target, 0.0, math.inf)
    mask, lse = outs[1], outs[4]
    assert [(t.shape, t.dtype) for t in outs] == \
        [(b, f32), (b, torch.bool), ((1,), torch.int64), ((1,), f32), (b, f32)]
    grad_out = torch.empty((), device=META)
    d = c.lsc_loss_bwd(grad_out, logits, target, lse, mask)
    assert (d.shape, d.dtype) == (logits.shape, dtype)
    out = c.lsc_loss_trades_fwd(logits, torch.empty_like(logits), target, TRADES_BETA, 0.0, 1.7)
    assert [(t.shape, t.dtype) for t in out] == \
        [(b, f32), (b, torch.bool), ((1,), torch.int64), ((1,), f32), (b, f32), (b, f32), (b, f32)]
    d_nat, d_adv = c.lsc_loss_trades_bwd(grad_out, logits, logits, target, *out[4:], out[1], TRADES_BETA)
    assert (d_nat.shape, d_nat.dtype, d_adv.shape, d_adv.dtype) == (logits.shape, dtype, logits.shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_weight_ops_shapes_and_dtypes(c, dtype):
    table = SegmentTable.from_numels([1, 37, 4101], 4096).to(META)
    w = torch.empty(table.numel, device=META, dtype=dtype)
    sq = c.segment_sq_norm(w, table)
    assert (sq.shape, sq.dtype) == ((3,), torch.float32)
    sq = c.accumulate_sq_norm_(w, torch.empty_like(w), table, torch.empty(3, device=META))
    assert (sq.shape, sq.dtype) == ((3,), torch.float32)
    assert c.perturb_axpy_(w, torch.empty_like(w), sq, table, -1) is w


def test_fake_tensor_mode_traces_every_op(c):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(5, 100, dtype=torch.float16)
        target = torch.empty(5, dtype=torch.long)
        out = c.lsc_loss_trades_fwd(logits, logits.clone(), target, TRADES_BETA, 0.0, 1.7)
        assert [t.shape for t in out] == [(5,), (5,), (1,), (1,), (5,), (5,), (5,)]
        x = torch.empty(4, 3, 8, 8)
        assert c.pgd_step(x, x.clone(), x.clone(), 0.1, 0.1, "linf", x).shape == x.shape


def test_compile_fullgraph_over_meta_tensors(c):
    """torch.compile(fullgraph=True) traces the custom ops with their fake implementations, with no
    graph break. That includes the auto-functionalization of the in-place ops. aot_eager then runs
    the graph on meta tensors, so this needs no GPU."""
    table = SegmentTable.from_numels([5, 1, 9000], 4096).to(META)

    def step(x_adv, grad, x_nat, logits, target, w, a, g):
        c.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", x_adv)  # in place
        _loss, mask, count, masked_mean, lse = c.lsc_loss_fwd(logits, target, 0.0, 1.7)
        dlogits = c.lsc_loss_bwd(masked_mean.view(()), logits, target, lse, mask)
        a_sq = c.accumulate_sq_norm_(a, g, table, None)
        c.perturb_axpy_(w, a, c.segment_sq_norm(w, table) / a_sq, table, 1)
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
def test_opcheck_on_meta_tensors(c, name):
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


def test_cpu_tensors_get_a_message_naming_the_argument(c):
    """The ops are also registered for CPU, only to fail with a message that names the argument.
    Without that, the dispatcher's generic "Could not run ... 'CPU' backend" would be the error."""
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=re.escape("pgd_step: x_adv must be a CUDA tensor, got device cpu")):
        c.pgd_step(x, x, x, 0.1, 0.1, "linf", x.clone())
    with pytest.raises(RuntimeError, match=re.escape("pgd_step_: x_adv must be a CUDA tensor, got device cpu")):
        c.pgd_step_(x, x, x, 0.1, 0.1, "linf")
    with pytest.raises(RuntimeError, match=re.escape("lsc_loss_fwd: logits must be a CUDA tensor")):
        c.lsc_loss_fwd(x, torch.zeros(2, dtype=torch.long), 0.0, 1.0)
    table = SegmentTable.from_numels([2, 4], 4)
    with pytest.raises(RuntimeError, match=re.escape("segment_sq_norm: x must be a CUDA tensor")):
        c.segment_sq_norm(torch.zeros(6), table)


# ============================================================================= GPU: helpers
def _unaligned(t):
    """A contiguous copy of t whose data starts one element past an allocation, so no pointer is
    16-byte aligned: the kernels' scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _poison_allocator():
    """Best effort: fill the caching allocator's free blocks with 0xFF bytes, which is NaN for
    floats, True for bools and -1 for ints. The next outputs that C++ allocates with at::empty then
    start as garbage, so any element a kernel forgets to write shows up in the comparisons."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in (512, 4096, 1 << 16, 1 << 20)]
    del blocks


def _pgd_inputs(shape, dtype, eps):
    """x_nat in [0, 1]; x_adv up to 1.5·ε away, so the projection clips; grad with exact zeros."""
    x_nat = torch.rand(shape, device="cuda")
    x_adv = (x_nat + (torch.rand(shape, device="cuda") * 3 - 1.5) * eps).clamp(0, 1)
    grad = torch.randn(shape, device="cuda")
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


# Shapes: batch 1, 7 and 129. Row lengths 75 and 147 are not multiples of the 4- or 8-element pack,
# so the scalar tail runs. CIFAR's 3072 runs the packed path. (7, 1) has one element per row.
PGD_SHAPES = [(1, 3, 5, 5), (7, 3, 32, 32), (129, 3, 7, 7), (7, 1)]


def _l2_atol(dtype):
    # The L2 norms are fp32 sums in another order than torch's: about 1e-6 relative. δ ≤ ε ≈ 0.5,
    # so fp32 outputs differ by ≲ 5e-7 (2e-6 leaves 4×). fp16/bf16 outputs in [0, 1] can then round
    # one ulp apart, and one ulp ≤ finfo.eps there.
    return 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps


# ============================================================================= GPU: pgd_step
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_pgd_step_linf_is_bit_exact(c, dtype, shape, aligned):
    """The same fp32 ops in the same order, on the same fp32 inputs, rounded once to dtype. That is
    bit-exact for fp32, and so for fp16/bf16 too."""
    x_adv, grad, x_nat = _pgd_inputs(shape, dtype, EPS_LINF)
    if not aligned:
        x_adv, grad, x_nat = _unaligned(x_adv), _unaligned(grad), _unaligned(x_nat)
    expected = pgd_step_ref(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf")
    out = torch.full_like(x_adv, math.nan)
    assert c.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", out) is out
    assert torch.equal(out, expected)
    in_place = x_adv.clone()
    c.pgd_step(in_place, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", in_place)
    assert torch.equal(in_place, expected)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_pgd_step_l2(c, dtype, shape, aligned):
    x_adv, grad, x_nat = _pgd_inputs(shape, dtype, EPS_L2)
    if not aligned:
        x_adv, grad, x_nat = _unaligned(x_adv), _unaligned(grad), _unaligned(x_nat)
    expected = pgd_step_ref(x_adv, grad, x_nat, ALPHA_L2, EPS_L2, "l2")
    out = torch.full_like(x_adv, math.nan)
    c.pgd_step(x_adv, grad, x_nat, ALPHA_L2, EPS_L2, "l2", out)
    torch.testing.assert_close(out, expected, rtol=0, atol=_l2_atol(dtype))
    in_place = x_adv.clone()
    c.pgd_step(in_place, grad, x_nat, ALPHA_L2, EPS_L2, "l2", in_place)
    torch.testing.assert_close(in_place, expected, rtol=0, atol=_l2_atol(dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("noise_dtype", ["float32", "same"])
def test_pgd_random_init(c, dtype, shape, noise_dtype):
    x_nat = torch.rand(shape, device="cuda").to(dtype)
    nd = torch.float32 if noise_dtype == "float32" else dtype
    uniform = (torch.rand(shape, device="cuda") * 2 - 1).to(nd)
    out = torch.full_like(x_nat, math.nan)
    c.pgd_random_init(x_nat, uniform, EPS_LINF, "linf", None, out)
    # ε·noise is rounded, then added: the reference's two fp32 ops, so this is bit-exact.
    assert torch.equal(out, pgd_random_init_ref(x_nat, uniform, EPS_LINF, "linf"))
    gauss = torch.randn(shape, device="cuda").to(nd)
    radius = torch.rand(shape[0], device="cuda")
    out = torch.full_like(x_nat, math.nan)
    c.pgd_random_init(_unaligned(x_nat), _unaligned(gauss), EPS_L2, "l2", radius, out)
    torch.testing.assert_close(out, pgd_random_init_ref(x_nat, gauss, EPS_L2, "l2", radius),
                               rtol=0, atol=_l2_atol(dtype))


# ============================================================================= GPU: lsc_loss
# (1000, 10): more rows than the masked sum's 256 threads, so each thread adds several
LSC_SIZES = [(1, 10), (7, 100), (129, 1000), (129, 10), (7, 33), (1000, 10)]


def _q_between(loss):
    """A q that splits the batch with a wide margin: the middle of the largest gap between sorted
    losses. A loss never lands within rounding of q, so the mask cannot flip on the last bit."""
    s = loss.double().sort().values
    if s.numel() < 2:
        return float(s[0]) + 1.0
    k = int((s[1:] - s[:-1]).argmax())
    return float((s[k] + s[k + 1]) / 2)


def _assert_close_to_truth(got, torch_result, truth, fp32_ulps=32):
    """The kernel's error against the fp64 truth is at most 2× torch's own error at the same dtype
    (STYLE.md, "Tests against the reference"), plus a floor of `fp32_ulps` fp32 ulps of the largest
    value.
    The floor matters only for fp32 outputs, where both errors are fp32 rounding of the same size
    and 2× alone would be a coin flip. An lse ≈ 10 carries about 1 ulp(10) ≈ 1e-6 of absolute error,
    which is a relative error of about 1e-6 in every softmax entry. 32 ulps ≈ 4e-6 covers that 4×. A
    wrong formula is off by O(1)."""
    scale = truth.abs().max().item()
    err_kernel = (got.double() - truth).abs().max().item()
    err_torch = (torch_result.double() - truth).abs().max().item()
    floor = fp32_ulps * torch.finfo(torch.float32).eps * scale
    assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch, floor)


def _check_lsc_fwd(loss, mask, count, masked_mean, loss_ref, mask_ref, batch):
    # Per-example CE from the same fp32 logits: online log-sum-exp over ≤ 1000 classes with expf and
    # logf, against torch's max-subtract log_softmax. The two differ by a few fp32 ulps of lse ≈ 10.
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, mask_ref)
    assert count.dtype == torch.int64 and count.item() == int(mask_ref.sum())
    # Σ maskᵢ·ℓᵢ / B, where B is the whole batch: fp32 sums over ≤ B/256 rows per thread plus a
    # 256-leaf tree, against torch's own fp32 sum; both within ~B·2⁻²⁴ relative of the exact sum.
    torch.testing.assert_close(masked_mean.view(()), (loss_ref * mask_ref).sum() / batch, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", LSC_SIZES)
def test_lsc_loss_forward_and_backward(c, dtype, batch, classes):
    logits = (torch.randn(batch, classes, device="cuda") * 3).to(dtype)
    target = torch.randint(0, classes, (batch,), device="cuda")
    _, loss_all, _, _ = lsc_loss_ref(logits, target)
    q = _q_between(loss_all)
    z = logits.detach().clone().requires_grad_(True)
    mean_ref, loss_ref, mask_ref, _ = lsc_loss_ref(z, target, 0.0, q)
    grad_out = torch.tensor(0.75, device="cuda")
    mean_ref.backward(grad_out)

    _poison_allocator()
    loss, mask, count, masked_mean, lse = c.lsc_loss_fwd(logits, target, 0.0, q)
    _check_lsc_fwd(loss, mask, count, masked_mean, loss_ref, mask_ref, batch)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), dim=1), rtol=1e-6, atol=1e-5)

    _poison_allocator()
    dlogits = c.lsc_loss_bwd(grad_out, logits, target, lse, mask)
    assert dlogits.dtype == dtype
    z64 = logits.double()
    onehot = torch.nn.functional.one_hot(target, classes).double()
    coef = (grad_out.double() / batch * mask_ref.double())[:, None]
    truth = coef * (torch.softmax(z64, dim=1) - onehot)
    _assert_close_to_truth(dlogits, z.grad, truth)


@gpu
@pytest.mark.parametrize("batch,classes", [(7, 10)])
def test_lsc_loss_range_edges(c, batch, classes):
    """p = q masks nothing, so count = 0 and masked_mean = 0. [0, inf) masks everything."""
    logits = torch.randn(batch, classes, device="cuda")
    target = torch.randint(0, classes, (batch,), device="cuda")
    _, mask, count, masked_mean, _ = c.lsc_loss_fwd(logits, target, 1.0, 1.0)
    assert not mask.any() and count.item() == 0 and masked_mean.item() == 0.0
    loss, mask, count, masked_mean, _ = c.lsc_loss_fwd(logits, target, 0.0, math.inf)
    assert mask.all() and count.item() == batch
    # Two fp32 sums of the same 7 non-negative losses in different orders, each within 6·u of the exact sum
    # (u = 2⁻²⁴ ≈ 6.0e-8), then one division by 7 each (1 rounding; 2 if torch multiplies by a rounded 1/7):
    # ≤ (6 + 6 + 1 + 2)·u ≈ 8.9e-7 relative, under 1e-6. Non-negative terms: no cancellation to amplify it.
    torch.testing.assert_close(masked_mean.view(()), loss.mean(), rtol=1e-6, atol=0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", LSC_SIZES)
def test_lsc_loss_trades_forward_and_backward(c, dtype, batch, classes):
    logits_nat = (torch.randn(batch, classes, device="cuda") * 2).to(dtype)
    logits_adv = (logits_nat.float() + torch.randn(batch, classes, device="cuda")).to(dtype)
    target = torch.randint(0, classes, (batch,), device="cuda")
    _, loss_all, _, _ = lsc_loss_trades_ref(logits_nat, logits_adv, target, TRADES_BETA)
    q = _q_between(loss_all)
    zn = logits_nat.detach().clone().requires_grad_(True)
    za = logits_adv.detach().clone().requires_grad_(True)
    mean_ref, loss_ref, mask_ref, _ = lsc_loss_trades_ref(zn, za, target, TRADES_BETA, 0.0, q)
    grad_out = torch.tensor(1.25, device="cuda")
    mean_ref.backward(grad_out)

    _poison_allocator()
    out = c.lsc_loss_trades_fwd(logits_nat, logits_adv, target, TRADES_BETA, 0.0, q)
    loss, mask, count, masked_mean, lse_nat, lse_adv, kl = out
    _check_lsc_fwd(loss, mask, count, masked_mean, loss_ref, mask_ref, batch)
    log_p_nat = torch.log_softmax(logits_nat.double(), 1)
    log_p_adv = torch.log_softmax(logits_adv.double(), 1)
    kl_truth = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1)
    # kl is a sum of C terms of either sign, so its fp32 error is absolute, about C·ulp(p·log p).
    torch.testing.assert_close(kl.double(), kl_truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_nat, torch.logsumexp(logits_nat.float(), 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_adv, torch.logsumexp(logits_adv.float(), 1), rtol=1e-6, atol=1e-5)

    _poison_allocator()
    d_nat, d_adv = c.lsc_loss_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl,
                                         mask, TRADES_BETA)
    assert d_nat.dtype == dtype and d_adv.dtype == dtype
    p_nat, p_adv = log_p_nat.exp(), log_p_adv.exp()
    onehot = torch.nn.functional.one_hot(target, classes).double()
    coef = (grad_out.double() / batch * mask_ref.double())[:, None]
    truth_nat = coef * ((p_nat - onehot)
                        + TRADES_BETA * p_nat * (log_p_nat - log_p_adv - kl_truth[:, None]))
    truth_adv = coef * TRADES_BETA * (p_adv - p_nat)
    # The TRADES bracket subtracts kl, itself a sum of C fp32 terms, from log-ratios up to ≈ 10: a
    # fp32 error of ~1e-5 relative, so the fp32 floor is 128 ulps ≈ 1.5e-5.
    _assert_close_to_truth(d_nat, zn.grad, truth_nat, fp32_ulps=128)
    _assert_close_to_truth(d_adv, za.grad, truth_adv, fp32_ulps=128)


# ============================================================================= GPU: weight_perturb
# A 1-element segment first, so every later segment starts at an odd offset (unaligned chunks).
# Sizes are not multiples of the chunk, and some segments span several chunks. chunk 64 makes the
# per-segment finalize loop over more than 32 partials.
WP_LAYOUTS = [([1, 37, 4101, 8192, 3], 4096), ([300, 1, 64, 65, 129, 1000, 2], 64), ([1], 4096),
              ([4096, 4096, 12], 4096)]
# Norms are fp32 partial sums against the reference's fp64 accumulation: ≲ log2(n)·2⁻²⁴ ≈ 1e-6
# relative. rtol 1e-5 leaves 10×.
NORM_TOL = {"rtol": 1e-5, "atol": 0}


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", range(len(WP_LAYOUTS)))
@pytest.mark.parametrize("aligned", [True, False])
def test_weight_perturb_ops(c, dtype, layout, aligned):
    numels, chunk = WP_LAYOUTS[layout]
    table = SegmentTable.from_numels(numels, chunk).to("cuda")
    w = (torch.randn(table.numel, device="cuda") * 0.05).to(dtype)
    a = torch.randn(table.numel, device="cuda").to(dtype)
    g = torch.randn(table.numel, device="cuda").to(dtype)
    if not aligned:
        w, a, g = _unaligned(w), _unaligned(a), _unaligned(g)
    beta = torch.rand(table.num_segments, device="cuda")
    scale = torch.rand(table.num_segments, device="cuda") * 1e-2

    _poison_allocator()
    sq = c.segment_sq_norm(w, table)
    torch.testing.assert_close(sq, segment_sq_norm_ref(w, table.offsets), **NORM_TOL)
    # The per-segment sum has a fixed order and no float atomics: identical bits from run to run.
    assert torch.equal(sq, c.segment_sq_norm(w, table))

    for b in (None, beta):
        a_ref, sq_ref = accumulate_sq_norm_ref(a, g, table.offsets, b)
        _poison_allocator()
        sq = c.accumulate_sq_norm_(a, g, table, b)
        # β·a + g: the reference's fp32 ops, rounded once to dtype. Bit-exact at every dtype.
        assert torch.equal(a, a_ref)
        torch.testing.assert_close(sq, sq_ref, **NORM_TOL)

    for sign in (1, -1):
        expected = perturb_axpy_ref(w, a, scale, table.offsets, sign)
        assert c.perturb_axpy_(w, a, scale, table, sign) is w
        assert torch.equal(w, expected)  # s·a rounded, then added: bit-exact at every dtype


# ============================================================================= GPU: argument checks
def _raises(message):
    return pytest.raises(RuntimeError, match=re.escape(message))


@gpu
def test_error_messages_name_the_argument(c):
    x_adv, grad, x_nat = _pgd_inputs((4, 3, 8, 8), torch.float32, EPS_LINF)
    out = torch.empty_like(x_adv)
    with _raises("pgd_step: grad must be a CUDA tensor, got device cpu"):
        c.pgd_step(x_adv, grad.cpu(), x_nat, 0.1, 0.1, "linf", out)
    with _raises("pgd_step: grad must have the dtype of x_adv (Float), got Half"):
        c.pgd_step(x_adv, grad.half(), x_nat, 0.1, 0.1, "linf", out)
    with _raises("pgd_step: x_nat must have the same shape as x_adv, got [3, 3, 8, 8] and [4, 3, 8, 8]"):
        c.pgd_step(x_adv, grad, x_nat[:3], 0.1, 0.1, "linf", out)
    with _raises("pgd_step: grad must be contiguous"):
        c.pgd_step(x_adv, grad.transpose(2, 3), x_nat, 0.1, 0.1, "linf", out)
    with _raises("pgd_step: x_adv must be float32, float16 or bfloat16, got Double"):
        c.pgd_step(x_adv.double(), grad.double(), x_nat.double(), 0.1, 0.1, "linf", out.double())
    with _raises("pgd_step: norm must be 'linf' or 'l2', got 'l1'"):
        c.pgd_step(x_adv, grad, x_nat, 0.1, 0.1, "l1", out)
    with _raises("pgd_random_init: radius is required for norm='l2'"):
        c.pgd_random_init(x_nat, grad, 0.1, "l2", None, out)

    logits = torch.randn(4, 10, device="cuda")
    target = torch.randint(0, 10, (4,), device="cuda")
    with _raises("lsc_loss_fwd: target must be Long, got Int"):
        c.lsc_loss_fwd(logits, target.int(), 0.0, 1.0)
    with _raises("lsc_loss_fwd: logits must be 2-D (B, C)"):
        c.lsc_loss_fwd(logits[0], target, 0.0, 1.0)
    with _raises("lsc_loss_fwd: target must be a CUDA tensor"):
        c.lsc_loss_fwd(logits, target.cpu(), 0.0, 1.0)
    with _raises("lsc_loss_fwd: the LSC range [p, q) needs p <= q"):
        c.lsc_loss_fwd(logits, target, 2.0, 1.0)
    _, mask, _, _, lse = c.lsc_loss_fwd(logits, target, 0.0, 1.0)
    with _raises("lsc_loss_bwd: grad_out must have one element"):
        c.lsc_loss_bwd(torch.ones(2, device="cuda"), logits, target, lse, mask)
    with _raises("lsc_loss_bwd: lse must have shape [4], got [3]"):
        c.lsc_loss_bwd(torch.ones((), device="cuda"), logits, target, lse[:3], mask)

    table = SegmentTable.from_numels([5, 7], 4)
    x = torch.randn(12, device="cuda")
    with _raises("segment_sq_norm: table.offsets must be a CUDA tensor"):
        c.segment_sq_norm(x, table)
    table = table.to("cuda")
    with _raises("segment_sq_norm: x must be a 1-D (N,) flat buffer"):
        c.segment_sq_norm(x.view(3, 4), table)
    with _raises("perturb_axpy_: sign must be +1 or -1, got 0"):
        c.perturb_axpy_(x, x.clone(), torch.ones(2, device="cuda"), table, 0)
    with _raises("accumulate_sq_norm_: beta must have shape [2], got [3]"):
        c.accumulate_sq_norm_(x, x.clone(), table, torch.ones(3, device="cuda"))


# ============================================================================= GPU: compile, sanitizer
@gpu
def test_compile_fullgraph_runs_the_kernels(c):
    """torch.compile(fullgraph=True) with Inductor: no graph break around the custom ops, and the
    compiled graph gives the eager results, including the in-place step written back."""
    x_adv, grad, x_nat = _pgd_inputs((7, 3, 32, 32), torch.float32, EPS_LINF)
    logits = torch.randn(7, 100, device="cuda")
    target = torch.randint(0, 100, (7,), device="cuda")

    def step(x_adv, grad, x_nat, logits, target):
        c.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", x_adv)
        loss, _mask, count, masked_mean, _lse = c.lsc_loss_fwd(logits, target, 0.0, 1.7)
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
def test_compute_sanitizer_memcheck_is_clean(c):
    exe = _compute_sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH (nor in $CUDA_HOME/bin)")
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
           str(ROOT / "bench" / "sanitize_cuda_ops.py")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
