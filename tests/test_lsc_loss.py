"""The fused op ``lsc_loss`` against its reference ``rwp_fast.reference.lsc_loss`` (SPEC.md §2):
per-example loss, LSC mask p ≤ ℓᵢ < q, masked mean over the whole batch, and the backward against
autograd of the reference.
"""

import math

import pytest
import torch

from kernel_helpers import poison_cuda_allocator
from rwp_fast import ops
from rwp_fast.ops import dispatch
from rwp_fast.reference.lsc_loss import lsc_loss_ref, lsc_loss_trades_ref, lsc_mask_ref
from rwp_fast.verify import tolerances

# Batch 1, 7, 129; C = 10, 100, 1000, and 2500 (three 1024-wide blocks: the online log-sum-exp), and C = 33,
# no multiple of a vector width. (Batch 1000, more rows than the CUDA masked sum's 256 threads: see
# test_masked_mean_and_count_are_fixed_order.)
SIZES = [(1, 10), (7, 10), (129, 10), (7, 100), (129, 100), (7, 1000), (2, 2500), (7, 33)]
# Per-example loss: lse summed over C exp terms in another order (tree vs torch's), plus a differently
# rounded subtraction: a few ulps of lse ≤ ~12 (ulp 1e-6), so atol 5e-6 with rtol 1e-5.
# On a GPU the Triton kernels add the hardware exp/log (ex2.approx/lg2.approx: ≤ 2 ulp, plus |z − max|·2⁻²⁴
# relative from rounding the exp argument; kernels/lsc_loss.py): for |z − max| ≤ 20 here that is ≤ 22 ulp
# of one exp term, about 1.3e-6 relative, inside rtol 1e-5. The divisions by B are IEEE (tl.div_rn).
LOSS_TOL = tolerances.LSC_LOSS_TOL  # the one table, shared with `rwp-fast verify`
# Gradients: softmax via exp(z − lse) vs torch's exp(log_softmax): relative error ≈ ulp(lse)·few
# ≈ 2e-6, on values ≤ grad_out/B; atol covers probabilities that underflow differently near 1e-38.
GRAD_TOL = tolerances.LSC_GRAD_TOL
TRADES_BETA = 6.0


def make_logits(batch, classes, device, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(batch, classes, device=device) * scale).to(dtype)
    target = torch.randint(0, classes, (batch,), device=device)
    return logits, target


def ref_with_grad(fn, *logits_and_rest, grad_out=0.7):
    """Run a reference entry on fresh leaf copies of the logits; return its outputs and their grads."""
    n_logits = sum(isinstance(t, torch.Tensor) and t.is_floating_point() for t in logits_and_rest)
    leaves = [t.detach().clone().requires_grad_(True) for t in logits_and_rest[:n_logits]]
    outputs = fn(*leaves, *logits_and_rest[n_logits:])
    (outputs[0] * grad_out).backward()
    return outputs, [leaf.grad for leaf in leaves]


def check_mask(loss, mask, ref_loss, ref_mask, p, q):
    """The backend's mask is its own loss thresholded (exactly); it equals the reference's mask except
    where a loss lies within the loss tolerance of p or q."""
    assert torch.equal(mask, lsc_mask_ref(loss, p, q))
    near = ((ref_loss - p).abs() < 1e-4) | ((ref_loss - q).abs() < 1e-4)
    assert torch.equal(mask[~near], ref_mask[~near])


def _ranges(ref_loss_median):
    """[0, inf) (AWP), and a range that keeps roughly the middle of the losses (RWP-like)."""
    return [(0.0, math.inf), (0.5 * ref_loss_median, 1.5 * ref_loss_median)]


@pytest.mark.parametrize("batch,classes", SIZES)
def test_forward_and_backward_match_reference(backend, device, batch, classes):
    logits, target = make_logits(batch, classes, device)
    median = lsc_loss_ref(logits, target)[1].median().item()
    for p, q in _ranges(median):
        (ref_mean, ref_loss, ref_mask, _), (ref_grad,) = ref_with_grad(lsc_loss_ref, logits, target, p, q)
        x = logits.clone().requires_grad_(True)
        poison_cuda_allocator(device)
        mean, loss, mask, count = ops.lsc_loss(x, target, p, q, backend=backend)
        assert mean.shape == () and mean.dtype == torch.float32
        assert loss.dtype == torch.float32 and mask.dtype == torch.bool
        assert count.shape == () and count.dtype == torch.int64
        torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
        check_mask(loss, mask, ref_loss, ref_mask, p, q)
        assert count.item() == mask.sum().item()
        torch.testing.assert_close(mean, (loss * mask).sum() / batch, **LOSS_TOL)
        torch.testing.assert_close(mean, ref_mean, **LOSS_TOL)
        poison_cuda_allocator(device)
        (mean * 0.7).backward()
        torch.testing.assert_close(x.grad, ref_grad, **GRAD_TOL)
        assert (x.grad[~mask] == 0).all()  # masked-out examples get no gradient


@pytest.mark.parametrize("batch,classes", SIZES)
def test_trades_forward_and_backward_match_reference(backend, device, batch, classes):
    nat, target = make_logits(batch, classes, device)
    adv = nat + torch.randn_like(nat)
    median = lsc_loss_trades_ref(nat, adv, target, TRADES_BETA)[1].median().item()
    for p, q in _ranges(median):
        (ref_mean, ref_loss, ref_mask, _), (ref_d_nat, ref_d_adv) = ref_with_grad(
            lsc_loss_trades_ref, nat, adv, target, TRADES_BETA, p, q)
        x_nat, x_adv = nat.clone().requires_grad_(True), adv.clone().requires_grad_(True)
        poison_cuda_allocator(device)
        mean, loss, mask, count = ops.lsc_loss_trades(x_nat, x_adv, target, TRADES_BETA, p, q,
                                                      backend=backend)
        # β·KL multiplies the KL's own few-ulp error by 6: loosen atol accordingly.
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=3e-5)
        check_mask(loss, mask, ref_loss, ref_mask, p, q)
        assert count.item() == mask.sum().item()
        torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=3e-5)
        poison_cuda_allocator(device)
        (mean * 0.7).backward()
        torch.testing.assert_close(x_nat.grad, ref_d_nat, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(x_adv.grad, ref_d_adv, rtol=2e-5, atol=1e-7)


def test_trades_kl_output(kernel_backend, device):
    """The backend-level kl (B,) is Σ_c p_nat (log p_nat − log p_adv), ≥ 0, and 0 for identical logits."""
    impl = dispatch.backend_module(kernel_backend, "lsc_loss")
    nat, target = make_logits(7, 100, device)
    adv = nat + torch.randn_like(nat)
    out = impl.lsc_loss_trades_fwd(nat, adv, target, TRADES_BETA, 0.0, math.inf)
    kl = out[6]
    log_p_nat, log_p_adv = nat.log_softmax(1), adv.log_softmax(1)
    torch.testing.assert_close(kl, (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1), rtol=1e-5, atol=5e-6)
    same = impl.lsc_loss_trades_fwd(nat, nat, target, TRADES_BETA, 0.0, math.inf)[6]
    assert same.abs().max() < 1e-6  # ≈ Σ p·(rounding of two equal lse) ≈ ulp(lse)


@pytest.mark.parametrize("batch,classes", [(7, 33), (129, 1000)])
def test_saved_lse_is_the_log_sum_exp(kernel_backend, device, batch, classes):
    """The lse that the backend-level forwards save for the backward: log Σ exp over each row, within a few
    fp32 ulps of lse ≈ 10 (an online log-sum-exp against torch's max-subtract one)."""
    impl = dispatch.backend_module(kernel_backend, "lsc_loss")
    nat, target = make_logits(batch, classes, device)
    adv = nat + torch.randn_like(nat)
    poison_cuda_allocator(device)
    lse = impl.lsc_loss_fwd(nat, target, 0.0, math.inf)[4]
    torch.testing.assert_close(lse, torch.logsumexp(nat, 1), rtol=1e-6, atol=1e-5)
    poison_cuda_allocator(device)
    lse_nat, lse_adv = impl.lsc_loss_trades_fwd(nat, adv, target, TRADES_BETA, 0.0, math.inf)[4:6]
    torch.testing.assert_close(lse_nat, torch.logsumexp(nat, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_adv, torch.logsumexp(adv, 1), rtol=1e-6, atol=1e-5)


def test_mask_upper_bound_is_strict(backend, device):
    """A loss exactly equal to q is masked out; exactly equal to p is kept (p ≤ ℓ < q)."""
    # Rows of equal logits have CE = log C, the same fp32 value in every such row.
    logits, target = make_logits(7, 10, device)
    logits[:3] = 0.0
    loss = ops.lsc_loss(logits, target, backend=backend)[1]
    q = loss[0].item()  # the backend's own fp32 value: passed as fp32, it compares exactly
    assert loss[1].item() == q and loss[2].item() == q
    _, _, mask, count = ops.lsc_loss(logits, target, 0.0, q, backend=backend)
    assert not mask[:3].any()
    assert torch.equal(mask[3:], loss[3:] < q)
    assert count.item() == (loss < q).sum().item()
    _, _, mask, _ = ops.lsc_loss(logits, target, q, math.inf, backend=backend)
    assert mask[:3].all()
    # One class: CE = lse − z_y = 0 exactly in any arithmetic, so q = 0 masks everything out.
    one = torch.randn(5, 1, device=device)
    mean, loss, mask, count = ops.lsc_loss(one, torch.zeros(5, dtype=torch.int64, device=device), 0.0, 0.0,
                                           backend=backend)
    assert (loss == 0).all() and not mask.any() and count.item() == 0 and mean.item() == 0


def test_masked_mean_divides_by_batch(backend, device):
    """(1/B)·Σ Vᵢℓᵢ: one example in range out of 7 gives ℓ/7, not ℓ (the mean over the masked ones)."""
    logits, target = make_logits(7, 10, device, scale=0.0)  # every loss is log 10 ≈ 2.30
    logits[4, target[4]] = 5.0  # this one is confidently right: ℓ ≈ 0.06
    x = logits.clone().requires_grad_(True)
    mean, loss, mask, count = ops.lsc_loss(x, target, 0.0, 1.0, backend=backend)
    assert count.item() == 1 and mask[4]
    torch.testing.assert_close(mean, loss[4] / 7, rtol=1e-6, atol=0)
    mean.backward()
    expected = (logits[4].softmax(0) - torch.nn.functional.one_hot(target[4], 10)) / 7
    torch.testing.assert_close(x.grad[4], expected, **GRAD_TOL)


def test_empty_mask_gives_zero_mean_and_gradient(backend, device):
    logits, target = make_logits(7, 10, device)
    x = logits.clone().requires_grad_(True)
    mean, _, mask, count = ops.lsc_loss(x, target, 0.0, 0.0, backend=backend)
    assert count.item() == 0 and mean.item() == 0 and not mask.any()
    mean.backward()
    assert (x.grad == 0).all()


def test_validation_names_the_argument(kernel_backend, device, arg_error):
    logits, target = make_logits(4, 10, device)
    kw = {"backend": kernel_backend}
    with arg_error(ValueError, "logits"):
        ops.lsc_loss(logits[0], target, **kw)
    with arg_error(TypeError, "logits"):
        ops.lsc_loss(logits.double(), target, **kw)
    with arg_error(TypeError, "target"):
        ops.lsc_loss(logits, target.int(), **kw)
    with arg_error(ValueError, "target"):
        ops.lsc_loss(logits, target[:3], **kw)
    with arg_error(ValueError, "target"):
        ops.lsc_loss(logits, target.to("cpu" if device.type == "cuda" else "meta"), **kw)
    with arg_error(ValueError, "p, q"):
        ops.lsc_loss(logits, target, 2.0, 1.0, **kw)
    with arg_error(TypeError, "logits_adv"):
        ops.lsc_loss_trades(logits, logits.half(), target, TRADES_BETA, **kw)
    with arg_error(ValueError, "logits_adv"):
        ops.lsc_loss_trades(logits, logits[:, :9].contiguous(), target, TRADES_BETA, **kw)
    impl = dispatch.backend_module(kernel_backend, "lsc_loss")
    _loss, mask, _count, _masked_mean, lse = impl.lsc_loss_fwd(logits, target, 0.0, math.inf)
    with arg_error(ValueError, "logits"):  # the op makes strided logits contiguous; the kernel entry does not
        impl.lsc_loss_fwd(logits.t().contiguous().t(), target, 0.0, math.inf)
    with arg_error(ValueError, "grad_out"):
        impl.lsc_loss_bwd(torch.ones(2, device=device), logits, target, lse, mask)
    with arg_error(TypeError, "mask"):
        impl.lsc_loss_bwd(torch.ones((), device=device), logits, target, lse, mask.float())
    with arg_error(ValueError, "lse"):
        impl.lsc_loss_bwd(torch.ones((), device=device), logits, target, lse[:3], mask)


# ----------------------------------------------------------------------------- fp16 / bf16 on GPU
def _fp64_truth(logits, target, mask, grad_out):
    """Masked mean CE and its gradient in fp64 from the same low-precision logits (the truth)."""
    z = logits.double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z, target, reduction="none")
    ((loss * mask).sum() / logits.shape[0] * grad_out).backward()
    return loss.detach(), z.grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,classes", [(512, 10), (128, 100), (128, 1000)])
def test_low_precision_logits(backend, device, dtype, batch, classes):
    """The loss is fp32 math on the same low-precision inputs, so fp32 tolerances; the gradient is
    rounded to the logits' dtype, so its error vs the fp64 truth may be ~2× the reference's own."""
    logits, target = make_logits(batch, classes, device, dtype)
    (ref_mean, ref_loss, ref_mask, _), (ref_grad,) = ref_with_grad(lsc_loss_ref, logits, target, 0.0, 3.0)
    x = logits.clone().requires_grad_(True)
    mean, loss, mask, _ = ops.lsc_loss(x, target, 0.0, 3.0, backend=backend)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    check_mask(loss, mask, ref_loss, ref_mask, 0.0, 3.0)
    torch.testing.assert_close(mean, ref_mean, **LOSS_TOL)
    (mean * 0.7).backward()
    assert x.grad.dtype == dtype
    _, truth = _fp64_truth(logits, target, ref_mask, 0.7)
    ref_err = (ref_grad.double() - truth).abs().max().item()
    err = (x.grad.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-7, (err, ref_err)


def _q_between(loss):
    """A q that splits the batch with a wide margin: the middle of the largest gap between sorted losses.
    No loss lands within rounding of q, so the mask cannot flip on the last bit."""
    s = loss.double().sort().values
    k = int((s[1:] - s[:-1]).argmax())
    return float((s[k] + s[k + 1]) / 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,classes", [(7, 33), (129, 1000)])
def test_low_precision_trades_logits(backend, device, dtype, batch, classes):
    """TRADES on fp16/bf16 logits: the loss is fp32 math on the same inputs (fp32 tolerances); each gradient
    is rounded to the logits' dtype, and its error against the fp64 truth is at most 2× the reference's own,
    plus a floor of 128 fp32 ulps of the largest value (the bracket subtracts kl, itself a sum of C fp32
    terms, from log-ratios up to ≈ 10: ~1e-5 relative in fp32)."""
    nat = (torch.randn(batch, classes, device=device) * 2).to(dtype)
    adv = (nat.float() + torch.randn(batch, classes, device=device)).to(dtype)
    target = torch.randint(0, classes, (batch,), device=device)
    q = _q_between(lsc_loss_trades_ref(nat, adv, target, TRADES_BETA)[1])
    (ref_mean, ref_loss, ref_mask, _), ref_grads = ref_with_grad(lsc_loss_trades_ref, nat, adv, target,
                                                                 TRADES_BETA, 0.0, q, grad_out=1.25)
    x_nat, x_adv = nat.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    poison_cuda_allocator(device)
    mean, loss, mask, _ = ops.lsc_loss_trades(x_nat, x_adv, target, TRADES_BETA, 0.0, q, backend=backend)
    torch.testing.assert_close(loss, ref_loss, **tolerances.LSC_TRADES_LOSS_TOL)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(mean, ref_mean, **tolerances.LSC_TRADES_LOSS_TOL)
    poison_cuda_allocator(device)
    (mean * 1.25).backward()
    log_p_nat, log_p_adv = nat.double().log_softmax(1), adv.double().log_softmax(1)
    p_nat, p_adv = log_p_nat.exp(), log_p_adv.exp()
    kl = (p_nat * (log_p_nat - log_p_adv)).sum(1, keepdim=True)
    coef = (1.25 / batch * ref_mask.double())[:, None]
    onehot = torch.nn.functional.one_hot(target, classes).double()
    truths = (coef * ((p_nat - onehot) + TRADES_BETA * p_nat * (log_p_nat - log_p_adv - kl)),
              coef * TRADES_BETA * (p_adv - p_nat))
    for got, ref_grad, truth in zip((x_nat.grad, x_adv.grad), ref_grads, truths):
        assert got.dtype == dtype
        err = (got.double() - truth).abs().max().item()
        ref_err = (ref_grad.double() - truth).abs().max().item()
        floor = 128 * torch.finfo(torch.float32).eps * truth.abs().max().item()
        assert err <= 2 * ref_err + floor, (err, ref_err, floor)


def test_strided_logits_are_accepted(backend, device):
    """Logits that are a transposed view are made contiguous by the op, as the kernels need; the
    result and the gradient (which flows back into the strided view) equal the reference's."""
    storage = torch.randn(10, 7, device=device) * 3  # (C, B) in memory
    target = torch.randint(0, 10, (7,), device=device)
    got_leaf, ref_leaf = storage.clone().requires_grad_(True), storage.clone().requires_grad_(True)
    assert not got_leaf.t().is_contiguous()
    got = ops.lsc_loss(got_leaf.t(), target, 0.0, 2.0, backend=backend)
    ref = lsc_loss_ref(ref_leaf.t(), target, 0.0, 2.0)
    torch.testing.assert_close(got[1], ref[1], **LOSS_TOL)
    got[0].backward()
    ref[0].backward()
    torch.testing.assert_close(got_leaf.grad, ref_leaf.grad, **GRAD_TOL)
    got = ops.lsc_loss_trades(got_leaf.t(), got_leaf.t() * 0.5, target, TRADES_BETA, backend=backend)
    ref = lsc_loss_trades_ref(ref_leaf.t(), ref_leaf.t() * 0.5, target, TRADES_BETA)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("trades", [False, True])
def test_nan_and_inf_rows_reach_the_gradient_as_in_the_reference(backend, device, trades):
    """A NaN or inf loss is outside every mask, yet the reference's autograd gives that row 0·NaN = NaN
    gradients (a diverged batch must not look healthy). The CUDA backward once wrote zeros there
    (bench/results/2026-12-04-h200: 20 NaN missing for CE, 30 for TRADES)."""
    logits, target = make_logits(12, 10, device)
    logits[3, 1] = float("nan")   # NaN logit: NaN lse, NaN loss
    logits[4, 2] = float("inf")   # inf logit: inf − inf in the softmax
    logits[5] = -float("inf")     # all −inf but one: p log p = 0·(−inf) in the KL
    logits[5, 0] = 0.0
    other = torch.randn_like(logits)
    other[5] = logits[5]
    args = (logits, other, target, TRADES_BETA) if trades else (logits, target)
    ref_fn = lsc_loss_trades_ref if trades else lsc_loss_ref
    fast_fn = ops.lsc_loss_trades if trades else ops.lsc_loss
    ref, ref_grads = ref_with_grad(ref_fn, *args)
    n_logits = 2 if trades else 1
    leaves = [t.detach().clone().requires_grad_(True) for t in args[:n_logits]]
    out = fast_fn(*leaves, *args[n_logits:], backend=backend)
    (out[0] * 0.7).backward()
    assert torch.isnan(ref[0]) and torch.isnan(out[0])
    for leaf, ref_grad in zip(leaves, ref_grads):
        assert ref_grad.isnan().sum() >= 10  # the case is live: whole NaN rows in the reference
        assert torch.equal(leaf.grad.isnan(), ref_grad.isnan())
        finite = ~ref_grad.isnan()
        # the one table's error model: TRADES's β-weighted KL gradient has its own atol, and both grow with
        # max|z| (z − lse cancels to a few ulps of |z|); GRAD_TOL alone is CE's (failed under ISA=default)
        zmax = float(torch.cat([t[t.isfinite()] for t in args[:n_logits]]).abs().max())
        tol = tolerances.lsc_loss("grad", torch.float32, trades, zmax, classes=logits.shape[1])
        torch.testing.assert_close(leaf.grad[finite], ref_grad[finite], atol=tol.atol, rtol=tol.rtol)


def test_masked_mean_and_count_are_fixed_order(backend, device):
    """The count is int64 like the reference's, and two calls on the same logits give the same bits
    (a one-program fixed-order sum instead of float atomics, whose order varies on a GPU)."""
    logits, target = make_logits(1000, 10, device)
    first = ops.lsc_loss(logits, target, 0.0, 2.0, backend=backend)
    second = ops.lsc_loss(logits, target, 0.0, 2.0, backend=backend)
    assert first[3].dtype == torch.int64 and first[3].shape == ()
    assert torch.equal(first[0], second[0]) and torch.equal(first[3], second[3])
    # and the sum is right over B = 1000 > 256 rows (the CUDA kernel's per-thread stride loop)
    ref_mean, _, ref_mask, ref_count = lsc_loss_ref(logits, target, 0.0, 2.0)
    check_mask(first[1], first[2], lsc_loss_ref(logits, target)[1], ref_mask, 0.0, 2.0)
    assert abs(int(first[3]) - int(ref_count)) <= int((~(first[2] == ref_mask)).sum())
    assert 0 < int(first[3]) < 1000  # a partial mask, so the sum has both kinds of rows
    # 1000 positive terms: the kernels' trees (≤ 4 sequential adds + 8–10 levels) and torch's sum are each
    # within ~12·2⁻²⁴ ≈ 7e-7 relative of the exact mean, inside LOSS_TOL's 1e-5
    torch.testing.assert_close(first[0], ref_mean, **LOSS_TOL)
