"""The fused op ``pgd_step`` against its reference ``rwp_fast.reference.pgd_step`` (SPEC.md §1).

L∞ must be bit-exact in fp32 (same fp32 ops, same order). L2 differs from the reference only by the
order of the fp32 sums in ‖g‖ and ‖δ'‖; each tolerance below says why it is that size.
"""


import re

import pytest
import torch

from rwp_fast import ops
from rwp_fast.ops import dispatch
from rwp_fast.reference.pgd_step import pgd_random_init_ref, pgd_step_ref
from rwp_fast.verify import tolerances

EPS_LINF, ALPHA_LINF = 8 / 255, 2 / 255
EPS_L2, ALPHA_L2 = 128 / 255, 15 / 255
# Odd sizes: batch 1, 7, 129; 7·5 = 35 and 129·192 elements are not multiples of any block size;
# (2, 3, 48, 48) rows (6912) exceed the L2 one-pass limit of 4096, so they stream.
SHAPES = [(1, 3, 32, 32), (7, 3, 32, 32), (129, 3, 8, 8), (7, 5), (1, 1), (2, 3, 48, 48)]
# |kernel − reference| for L2: both compute ‖·‖ as an fp32 sum of ≤ 7K squares in a different order,
# a relative difference of ~1e-6 at most; it scales |δ| ≤ ε < 1, so the output differs by < 1e-6,
# plus one fp32 ulp of the final x_nat + δ (6e-8 below 1).
L2_ATOL = tolerances.PGD_L2_ATOL  # the one table, shared with `rwp-fast verify`


def make_inputs(shape, device, eps, dtype=torch.float32, zero_frac=0.1):
    """x_nat with some saturated pixels, x_adv inside the ε-box, and a gradient with exact zeros."""
    x_nat = torch.rand(shape, device=device)
    x_nat.view(-1)[::11] = 0.0
    x_nat.view(-1)[5::13] = 1.0
    x_adv = (x_nat + (torch.rand(shape, device=device) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn(shape, device=device)
    grad[torch.rand(shape, device=device) < zero_frac] = 0.0
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def make_l2_inputs(shape, device, dtype=torch.float32):
    """As make_inputs, with x_adv − x_nat of per-example norm U(0, 1.5)·ε: after the step about half of
    the batch lies outside the ball, so both branches of min(1, ε/‖δ'‖) run."""
    x_adv, grad, x_nat = make_inputs(shape, device, 0.0)
    u = torch.randn(shape, device=device)
    radius = torch.rand(shape[0], device=device) * 1.5 * EPS_L2
    u = u * (radius / u.flatten(1).norm(dim=1)).view(-1, *[1] * (len(shape) - 1))
    x_adv = (x_nat.float() + u).clamp(0, 1)
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def nan_like(x):
    return torch.full_like(x, float("nan"))


# The L2 kernels have two Triton launch paths: rows ≤ L2_ONE_PASS_MAX elements held in registers, and
# streamed rows; "triton-streaming" lowers the limit to 0 so that small images exercise the second.
L2_BACKENDS = ["torch", "triton", "triton-streaming"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=L2_BACKENDS)
def l2_backend(request, require_backend, monkeypatch):
    name = require_backend(request.param.removesuffix("-streaming"))
    if request.param.endswith("-streaming"):
        from rwp_fast.kernels import pgd_step as kernel
        monkeypatch.setattr(kernel, "L2_ONE_PASS_MAX", 0)
    return name


# --------------------------------------------------------------------------------------------- L∞
@pytest.mark.parametrize("shape", SHAPES)
def test_linf_step_is_bit_exact(backend, device, shape):
    x_adv, grad, x_nat = make_inputs(shape, device, EPS_LINF)
    expected = pgd_step_ref(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf")
    out = ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", out=nan_like(x_adv), backend=backend)
    assert torch.equal(out, expected)
    # In place: out is x_adv itself.
    x_inplace = x_adv.clone()
    returned = ops.pgd_step_(x_inplace, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", backend=backend)
    assert returned.data_ptr() == x_inplace.data_ptr()
    assert torch.equal(x_inplace, expected)
    # Out of place without an `out`: allocates.
    assert torch.equal(ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, backend=backend), expected)


def test_linf_zero_gradient_does_not_move(backend, device):
    """sign(0) = 0 (and sign(−0) = 0): an iterate inside the ball and the box stays put exactly."""
    x_adv, _, x_nat = make_inputs((7, 3, 8, 8), device, EPS_LINF)
    grad = torch.zeros_like(x_adv)
    grad.view(-1)[::2] = -0.0
    out = ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", out=nan_like(x_adv), backend=backend)
    assert torch.equal(out, x_adv)


def test_linf_projection_and_box(backend, device):
    """Inside ball and box: a step of α < ε moves every pixel by exactly ±α; a huge step lands on the
    ε-box face, cut by [0, 1]."""
    shape = (7, 3, 8, 8)
    x_nat = 0.2 + 0.6 * torch.rand(shape, device=device)  # ε-box stays inside [0, 1]
    grad = torch.randn(shape, device=device)
    out = ops.pgd_step(x_nat, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", out=nan_like(x_nat), backend=backend)
    assert torch.equal(out, x_nat + ALPHA_LINF * torch.sign(grad))
    big = ops.pgd_step(x_nat, grad, x_nat, 1.0, EPS_LINF, "linf", out=nan_like(x_nat), backend=backend)
    assert torch.equal(big, x_nat + EPS_LINF * torch.sign(grad))
    # Near the box edges the [0, 1] clamp wins over the ε-box.
    edge = torch.rand(shape, device=device) * 0.01
    edge.view(-1)[::2] += 0.99
    big = ops.pgd_step(edge, grad, edge, 1.0, EPS_LINF, "linf", out=nan_like(edge), backend=backend)
    assert big.min() >= 0 and big.max() <= 1
    assert ((big - edge).abs() <= EPS_LINF + 1e-7).all()  # 1e-7: one fp32 ulp of x_nat + δ near 1


# ---------------------------------------------------------------------------------------------- L2
@pytest.mark.parametrize("shape", SHAPES)
def test_l2_step_matches_reference(l2_backend, device, shape):
    x_adv, grad, x_nat = make_l2_inputs(shape, device)
    expected = pgd_step_ref(x_adv, grad, x_nat, ALPHA_L2, EPS_L2, "l2")
    outside = (expected - x_nat).flatten(1).norm(dim=1) > EPS_L2 * (1 - 1e-4)
    if shape[0] > 100:
        assert 0 < outside.sum() < shape[0]  # both the projected and the unprojected branch ran
    out = ops.pgd_step(x_adv, grad, x_nat, ALPHA_L2, EPS_L2, "l2", out=nan_like(x_adv), backend=l2_backend)
    torch.testing.assert_close(out, expected, atol=L2_ATOL, rtol=0)
    x_inplace = x_adv.clone()
    ops.pgd_step_(x_inplace, grad, x_nat, ALPHA_L2, EPS_L2, "l2", backend=l2_backend)
    torch.testing.assert_close(x_inplace, expected, atol=L2_ATOL, rtol=0)


def test_l2_zero_gradient(l2_backend, device):
    """g = 0: g/(‖g‖ + 1e-10) = 0, no NaN; inside the ball and box the iterate stays put (up to the
    one-ulp rounding of x_nat + (x_adv − x_nat))."""
    x_adv, _, x_nat = make_inputs((7, 3, 8, 8), device, 1e-3)
    out = ops.pgd_step(x_adv, torch.zeros_like(x_adv), x_nat, ALPHA_L2, EPS_L2, "l2", out=nan_like(x_adv),
                       backend=l2_backend)
    torch.testing.assert_close(out, x_adv, atol=1.2e-7, rtol=0)


def test_l2_inside_ball_and_projection(l2_backend, device):
    """‖δ'‖ ≤ ε: no shrink (out = x_nat + α·g/‖g‖); ‖δ'‖ > ε: the step lands on the sphere ‖δ‖ = ε."""
    shape = (7, 3, 8, 8)
    x_nat = 0.3 + 0.4 * torch.rand(shape, device=device)
    grad = torch.randn(shape, device=device)
    alpha = 0.05  # ‖δ'‖ = α < ε, and |δ'| per pixel ≤ 0.05 keeps the box inactive
    out = ops.pgd_step(x_nat, grad, x_nat, alpha, EPS_L2, "l2", out=nan_like(x_nat), backend=l2_backend)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x_nat + alpha * unit, atol=L2_ATOL, rtol=0)
    eps = 0.5  # α = 2 > ε: projected; |δ| per pixel ≤ 0.5·max|unit| stays well inside the box here
    out = ops.pgd_step(x_nat, grad, x_nat, 2.0, eps, "l2", out=nan_like(x_nat), backend=l2_backend)
    assert ((x_nat + eps * unit - 0.5).abs() < 0.5).all()  # the box does not bind, so ‖δ‖ = ε exactly
    norms = (out - x_nat).flatten(1).norm(dim=1)
    # fp32 rounding of 192 pixel differences of size ~0.04 (ulp 4e-9 at 0.5): relative 1e-5 is ample.
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-5, atol=0)
    torch.testing.assert_close(out, x_nat + eps * unit, atol=L2_ATOL, rtol=0)


# ------------------------------------------------------------------------------------ random start
@pytest.mark.parametrize("shape", [(129, 3, 8, 8), (7, 5), (2, 3, 48, 48)])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_matches_reference(l2_backend, device, shape, norm):
    x_nat = torch.rand(shape, device=device)
    eps = EPS_LINF if norm == "linf" else EPS_L2
    if norm == "linf":
        noise, radius = torch.rand(shape, device=device) * 2 - 1, None
    else:
        noise, radius = torch.randn(shape, device=device), torch.rand(shape[0], device=device)
    expected = pgd_random_init_ref(x_nat, noise, eps, norm, radius)
    out = ops.pgd_random_init(x_nat, noise, eps, norm, radius, backend=l2_backend)
    if norm == "linf" and l2_backend != "cuda":
        # Triton launches with FMA contraction off, so x + ε·noise rounds as in torch: exact.
        assert torch.equal(out, expected)
    else:
        # L∞ on CUDA: an FMA may round x + ε·noise once instead of twice, 1 ulp (1.2e-7 near 1).
        # L2: ‖noise‖ summed in another order, as for the L2 step.
        torch.testing.assert_close(out, expected, atol=L2_ATOL, rtol=0)


# ------------------------------------------------------------------------------------- validation
def _other_device(device):
    return "cpu" if device.type == "cuda" else "meta"


def test_validation_names_the_argument(kernel_backend, device, arg_error):
    x_adv, grad, x_nat = make_inputs((4, 3, 8, 8), device, EPS_LINF)
    step = ops.pgd_step
    kw = {"backend": kernel_backend}
    with arg_error(TypeError, "grad"):
        step(x_adv, grad.double(), x_nat, ALPHA_LINF, EPS_LINF, **kw)
    with arg_error(TypeError, "x_adv"):  # one dtype throughout, but not fp32, fp16 or bf16
        step(x_adv.double(), grad.double(), x_nat.double(), ALPHA_LINF, EPS_LINF, **kw)
    with arg_error(TypeError, "x_nat"):
        step(x_adv, grad, x_nat.to(torch.float16), ALPHA_LINF, EPS_LINF, **kw)
    with arg_error(ValueError, "x_nat"):
        step(x_adv, grad, x_nat[:3], ALPHA_LINF, EPS_LINF, **kw)
    # Any layout is accepted by the op (an operand in another layout than the written tensor is copied to it); the
    # kernel-level host function itself still refuses a non-contiguous operand, naming it.
    g_t = grad.transpose(2, 3)
    assert torch.equal(step(x_adv, g_t, x_nat, ALPHA_LINF, EPS_LINF, **kw),
                       step(x_adv, g_t.contiguous(), x_nat, ALPHA_LINF, EPS_LINF, **kw))
    impl = dispatch.backend_module(kernel_backend, "pgd_step")
    with arg_error(ValueError, "grad"):
        impl.pgd_step(x_adv, g_t, x_nat, ALPHA_LINF, EPS_LINF, "linf", torch.empty_like(x_adv))
    with arg_error(ValueError, "grad"):
        step(x_adv, grad.to(_other_device(device)), x_nat, ALPHA_LINF, EPS_LINF, **kw)
    with arg_error(ValueError, "out"):
        step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, out=torch.empty(4, 3, 8, 9, device=device), **kw)
    with arg_error(ValueError, "norm"):
        step(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "l1", **kw)
    with arg_error(ValueError, "radius"):
        ops.pgd_random_init(x_nat, grad, EPS_L2, "l2", None, **kw)
    with arg_error(ValueError, "radius"):
        ops.pgd_random_init(x_nat, grad, EPS_L2, "l2", torch.rand(5, device=device), **kw)
    with arg_error(TypeError, "noise"):
        ops.pgd_random_init(x_nat, grad.double(), EPS_LINF, "linf", **kw)


def test_negative_radius_or_step_is_rejected(backend, device):
    x_adv, grad, x_nat = make_inputs((2, 3), device, EPS_LINF)
    with pytest.raises(ValueError, match="eps"):
        ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, -EPS_LINF, backend=backend)
    with pytest.raises(ValueError, match="alpha"):
        ops.pgd_step_(x_adv, grad, x_nat, -ALPHA_LINF, EPS_LINF, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        ops.pgd_random_init(x_nat, grad, float("nan"), backend=backend)


# ----------------------------------------------------------------------------- fp16 / bf16 on GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_low_precision_step(backend, device, dtype, norm):
    """Same fp32 math as the reference, rounded once on store. L∞: bit-exact at any dtype. L2: the error
    against the fp32 truth (the reference on upcast inputs, not rounded) is at most ~2× the reference's
    own rounding error at that dtype."""
    eps, alpha = (EPS_LINF, ALPHA_LINF) if norm == "linf" else (EPS_L2, ALPHA_L2)
    shape = (128, 3, 32, 32)
    x_adv, grad, x_nat = make_inputs(shape, device, eps, dtype) if norm == "linf" else make_l2_inputs(
        shape, device, dtype)
    expected = pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm)
    out = ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out=nan_like(x_adv), backend=backend)
    assert out.dtype == dtype
    if norm == "linf":
        assert torch.equal(out, expected)
        return
    truth = pgd_step_ref(x_adv.float(), grad.float(), x_nat.float(), alpha, eps, norm)
    ref_err = (expected.float() - truth).abs().max().item()
    err = (out.float() - truth).abs().max().item()
    assert err <= 2 * ref_err + L2_ATOL, (err, ref_err)


def test_triton_launches_run_on_the_tensors_device(require_backend, device, monkeypatch):
    """Triton launches on the current CUDA device, not on the tensors' one, so every host function of
    the three Triton modules wraps each launch in _common.on_device(tensor) (torch.cuda.device on CUDA,
    a no-op on CPU). Counted here per launch: pgd_step, lsc_loss and weight_perturb."""
    require_backend("triton")
    import contextlib

    from rwp_fast.kernels import _common
    from rwp_fast.kernels import lsc_loss as kl
    from rwp_fast.kernels import pgd_step as kp
    from rwp_fast.kernels import weight_perturb as kw
    from rwp_fast.ops.weight_perturb import SegmentTable

    seen = []

    @contextlib.contextmanager
    def record(t):
        seen.append(t.device)
        yield

    monkeypatch.setattr(_common, "on_device", record)
    x = torch.rand(3, 2, 4, 4, device=device)
    noise, radius = torch.randn_like(x), torch.rand(3, device=device)
    logits, target = torch.randn(3, 10, device=device), torch.randint(0, 10, (3,), device=device)
    table = SegmentTable.from_numels([5, 8], 4).to(device)
    w, a, scale = torch.randn(13, device=device), torch.randn(13, device=device), torch.rand(2, device=device)
    launches = [  # (call, number of kernel launches it makes)
        (lambda: kp.pgd_step(x, x, x, 0.1, 0.2, "linf", torch.empty_like(x)), 1),
        (lambda: kp.pgd_step_(x.clone(), x, x, 0.1, 0.2, "l2"), 1),
        (lambda: kp.pgd_random_init(x, noise, 0.2, "l2", radius, torch.empty_like(x)), 1),
        (lambda: kl.lsc_loss_fwd(logits, target, 0.0, 1.0), 1),
        (lambda: kl.lsc_loss_trades_fwd(logits, logits, target, 6.0, 0.0, 1.0), 1),
        (lambda: kw.segment_sq_norm(w, table), 2),
        (lambda: kw.accumulate_sq_norm_(a, w, table, None), 2),
        (lambda: kw.perturb_axpy_(w, a, scale, table, 1), 1),
    ]
    for call, n in launches:
        seen.clear()
        call()
        assert seen == [x.device] * n


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cuda"])
def test_a_radius_above_one_names_the_pixel_unit(backend_name):
    """ε = 8 where 8/255 was meant: refused at the op boundary, before any backend is chosen or loaded, so
    this runs on CPU for every backend, available here or not."""
    x_adv, grad, x_nat = make_inputs((2, 3), torch.device("cpu"), EPS_LINF)
    needle = "eps: 8 is in pixel units ([0, 1] images); did you pass 1/255 units? use 8/255"
    for norm in ("linf", "l2"):
        with pytest.raises(ValueError, match=re.escape(needle)):
            ops.pgd_step(x_adv, grad, x_nat, ALPHA_LINF, 8.0, norm, backend=backend_name)
        with pytest.raises(ValueError, match=re.escape(needle)):
            ops.pgd_step_(x_adv, grad, x_nat, ALPHA_LINF, 8.0, norm, backend=backend_name)
        with pytest.raises(ValueError, match=re.escape(needle)):
            ops.pgd_random_init(x_nat, grad, 8.0, norm, torch.rand(2) if norm == "l2" else None,
                                backend=backend_name)
    assert torch.equal(ops.pgd_step(x_nat, grad, x_nat, 1.0, 1.0, backend="torch"),
                       pgd_step_ref(x_nat, grad, x_nat, 1.0, 1.0))  # ε = 1, the whole box, is still allowed
    big = torch.rand(2, 3, 32, 32)  # L2 allows up to the box's diameter √3072 ≈ 55: ε = 3 is a real radius
    assert ops.pgd_step(big, torch.randn_like(big), big, 1.0, 3.0, "l2", backend="torch").shape == big.shape
    with pytest.raises(ValueError, match=re.escape("eps: 128 is in pixel units")):
        ops.pgd_step(big, torch.randn_like(big), big, 1.0, 128.0, "l2", backend="torch")


# ----------------------------------------------------------------------------------------- layouts
# A channels-last model's input gradient is channels-last (NHWC memory); the op reads any layout that
# all its operands share where it lies, and copies only an operand in another layout (to the layout of
# the tensor it writes). Odd sizes, so that no two of C, H, W are equal and no stride coincides.
LAYOUT_SHAPE = (3, 3, 5, 7)
CL = torch.channels_last
# Operand layouts (x_adv, grad, x_nat): 'N' NCHW-contiguous, 'C' channels-last. 'mixed': a channels-last
# iterate with an NCHW gradient; 'mixed-nchw': an NCHW iterate with a channels-last gradient.
LAYOUTS = {"contiguous": "NNN", "channels_last": "CCC", "mixed": "CNC", "mixed-nchw": "NCN"}
LOW_DTYPES = [torch.float32, torch.bfloat16]


def _to_layout(t, code):
    return t.contiguous(memory_format=CL) if code == "C" else t.contiguous()


def _is_cl(t):
    """Stored NHWC and not NCHW (with C = 3, H = 5, W = 7 the two never coincide)."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _skip_interpreted_bf16(backend, dtype):
    # The Triton interpreter truncates fp32 → bf16 on store where a GPU rounds to nearest even (measured:
    # NCHW L∞, exact on a GPU, is one bf16 ulp off there): the conftest's "fp32 only" for the interpreter.
    if backend == "triton" and dtype != torch.float32 and dispatch.triton_interpreting():
        pytest.skip("the Triton interpreter truncates to bf16 (a GPU rounds to nearest)")


def _assert_matches_ref(out, expected, truth, exact):
    """exact: bit-exact (L∞, any dtype). fp32: L2_ATOL (the sums' order, see L2_ATOL). bf16: as in
    test_low_precision_step, at most twice the reference's own rounding error against the fp32 truth."""
    if exact:
        assert torch.equal(out, expected)
    elif out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=L2_ATOL, rtol=0)
    else:
        ref_err = (expected.float() - truth).abs().max().item()
        err = (out.float() - truth).abs().max().item()
        assert err <= 2 * ref_err + L2_ATOL, (err, ref_err)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_any_shared_layout(backend, device, layout, norm, dtype):
    """Every layout gives the reference's result (computed on NCHW-contiguous copies); a new output has
    x_adv's layout; `out` and the in-place x_adv are written in the caller's own storage and strides."""
    _skip_interpreted_bf16(backend, dtype)
    eps, alpha = (EPS_LINF, ALPHA_LINF) if norm == "linf" else (EPS_L2, ALPHA_L2)
    nchw = (make_inputs(LAYOUT_SHAPE, device, eps, dtype) if norm == "linf"
            else make_l2_inputs(LAYOUT_SHAPE, device, dtype))
    expected = pgd_step_ref(*nchw, alpha, eps, norm)
    truth = pgd_step_ref(*(t.float() for t in nchw), alpha, eps, norm)
    x_adv, grad, x_nat = (_to_layout(t, c) for t, c in zip(nchw, LAYOUTS[layout]))
    want_cl = _is_cl(x_adv)
    exact = norm == "linf"

    out = ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, backend=backend)
    assert _is_cl(out) == want_cl and (want_cl or out.is_contiguous())
    _assert_matches_ref(out, expected, truth, exact)

    buf = nan_like(x_adv)  # full_like keeps x_adv's layout; NaN shows an element left unwritten
    strides = buf.stride()
    returned = ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out=buf, backend=backend)
    assert returned is buf and buf.stride() == strides
    _assert_matches_ref(buf, expected, truth, exact)

    x_inplace = x_adv.clone()  # clone keeps the layout
    ptr, strides = x_inplace.data_ptr(), x_inplace.stride()
    returned = ops.pgd_step_(x_inplace, grad, x_nat, alpha, eps, norm, backend=backend)
    assert returned is x_inplace and x_inplace.data_ptr() == ptr and x_inplace.stride() == strides
    _assert_matches_ref(x_inplace, expected, truth, exact)
    # pgd_step with out=x_adv is the in-place op too.
    x_inplace = x_adv.clone()
    assert ops.pgd_step(x_inplace, grad, x_nat, alpha, eps, norm, out=x_inplace, backend=backend) is x_inplace
    _assert_matches_ref(x_inplace, expected, truth, exact)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("layout", ["NN", "CC", "CN", "NC"])  # (x_nat, noise)
def test_random_init_any_layout(backend, device, layout, norm, dtype):
    """The random start in x_nat's layout, equal to the reference on NCHW copies whatever the noise's
    layout (a noise in another layout is copied to x_nat's, never read in the wrong order)."""
    _skip_interpreted_bf16(backend, dtype)
    eps = EPS_LINF if norm == "linf" else EPS_L2
    x_nat = torch.rand(LAYOUT_SHAPE, device=device).to(dtype)
    noise = torch.rand(LAYOUT_SHAPE, device=device) * 2 - 1 if norm == "linf" else torch.randn(LAYOUT_SHAPE,
                                                                                                 device=device)
    radius = None if norm == "linf" else torch.rand(LAYOUT_SHAPE[0], device=device)
    expected = pgd_random_init_ref(x_nat, noise, eps, norm, radius)
    truth = pgd_random_init_ref(x_nat.float(), noise, eps, norm, radius)
    x_nat_l, noise_l = _to_layout(x_nat, layout[0]), _to_layout(noise, layout[1])
    out = ops.pgd_random_init(x_nat_l, noise_l, eps, norm, radius, backend=backend)
    assert _is_cl(out) == (layout[0] == "C") and (layout[0] == "C" or out.is_contiguous())
    # Exact where test_random_init_matches_reference is (L∞ without the CUDA extension's FMA).
    _assert_matches_ref(out, expected, truth, exact=norm == "linf" and backend != "cuda")


class _CountCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that copy a tensor. The backends' ops are opaque custom ops: their insides
    (the Triton launch, the interpreter's own copies) run below this mode and are not counted."""
    COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            self.copies.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last_operands_are_not_copied(kernel_backend, device, norm):
    """All operands channels-last: the step, the in-place step and the random start dispatch no copy op
    (the kernels read the NHWC views); the same calls with one NCHW operand copy exactly that one."""
    eps, alpha = (EPS_LINF, ALPHA_LINF) if norm == "linf" else (EPS_L2, ALPHA_L2)
    x_adv, grad, x_nat = (t.contiguous(memory_format=CL) for t in make_inputs(LAYOUT_SHAPE, device, eps))
    noise = torch.randn_like(x_nat)  # randn_like keeps the layout
    radius = torch.rand(LAYOUT_SHAPE[0], device=device)
    assert all(_is_cl(t) for t in (x_adv, grad, x_nat, noise))

    def calls(grad, noise):
        x = x_adv.clone()
        out = nan_like(x_adv)
        with _CountCopies() as mode:
            ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, backend=kernel_backend)
            ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out=out, backend=kernel_backend)
            ops.pgd_step_(x, grad, x_nat, alpha, eps, norm, backend=kernel_backend)
            ops.pgd_random_init(x_nat, noise, eps, norm, radius, backend=kernel_backend)
        return mode.copies

    assert calls(grad, noise) == []
    # The counter sees the copies it is there to forbid: one per call with an NCHW operand.
    assert calls(grad.contiguous(), noise) == [torch.ops.aten.clone.default] * 3
    assert calls(grad, noise.contiguous()) == [torch.ops.aten.clone.default]


def test_channels_last_in_place_step_compiles(require_backend, device):
    """Under torch.compile (fullgraph) the in-place step on a channels-last x_adv writes through its NHWC
    view: functionalization must carry the write back to the caller's tensor, as in eager."""
    require_backend("triton")
    x_adv, grad, x_nat = (t.contiguous(memory_format=CL) for t in make_inputs(LAYOUT_SHAPE, device, EPS_LINF))
    expected = pgd_step_ref(x_adv, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf")

    def step(x):
        ops.pgd_step_(x, grad, x_nat, ALPHA_LINF, EPS_LINF, "linf", backend="triton")
        return x * 1

    torch._dynamo.reset()
    x = x_adv.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert _is_cl(x) and torch.equal(x, expected) and torch.equal(got, expected)
