"""Triton kernels for the fused op ``pgd_step``: one PGD step (sign or L2-normalised gradient, ascent,
projection onto the ε-ball, [0, 1] box clamp) and the PGD random start. SPEC.md §1.

The oracle is ``rwp_fast.reference.pgd_step``. Arithmetic is fp32 whatever the storage dtype (fp32,
fp16 or bf16), the result is rounded to the dtype of ``out`` on store.

* L∞ is elementwise and does the reference's fp32 operations in the reference's order, so it matches
  ``pgd_step_ref`` bit for bit. (α·sign(g) is exactly ±α or 0, so an FMA contraction of x_adv + α·sign(g)
  would round the same; the kernel is launched with ``NO_FMA`` anyway, as the random start must be.)
* Every clamp is NaN-propagating (``propagate_nan=ALL``: PTX ``min.NaN.f32``/``max.NaN.f32``), as
  torch.clamp is: with the default, sm_90 lowers them to ``min.f32``/``max.f32``, which return the
  non-NaN operand, and ptxas even folds the [0, 1] clamp into ``FADD.SAT``, so a NaN became 0 or 1 on
  a GPU while the reference, the interpreter and the CUDA extension give NaN.
* Divisions and square roots are IEEE round-to-nearest (``tl.div_rn``, ``tl.sqrt_rn``): a plain ``/``
  lowers to ``div.full.f32`` (2 ulp) and ``tl.sqrt`` to ``sqrt.approx.ftz.f32``, which the interpreter
  does not model. The compile check asserts that no ``.approx`` and no ``div.full`` is left here.
* L2 needs two per-example norms (‖g‖ and ‖δ'‖), so one program owns one example. Rows of up to
  ``L2_ONE_PASS_MAX`` elements (CIFAR's 3·32·32 = 3072) are held in registers and read once; longer
  rows are streamed three times (‖g‖², then δ' and ‖δ'‖², then the write), re-reading from L2 cache.
"""

import torch
import triton
import triton.language as tl

from ..core import L2_GRAD_EPS, NORMS
from . import _common
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor

# Elements per program of the elementwise (L∞) kernels. 2048 fp32 = 8 KiB per operand; with 4 warps
# that is 16 elements per thread, enough to keep loads in flight on an H100.
LINF_BLOCK = 2048
# Rows up to this many elements are processed in one register-resident pass (one read of each input);
# 4096 fp32 × 3 operands over 8 warps is 48 registers per thread. Tests lower it to 0 to exercise the
# streaming path on small images.
L2_ONE_PASS_MAX = 4096
L2_STREAM_BLOCK = 1024
# Launch option for kernels that must round like the reference's separate torch ops: no a·b + c
# contracted into one FMA (one rounding instead of two). Free for memory-bound kernels.
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp(x, lo, hi): NaN in, NaN out (see the module docstring)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pgd_step_linf_kernel(x_adv_ptr, grad_ptr, x_nat_ptr, out_ptr, n_elements, alpha, eps,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    x_adv = tl.load(x_adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    x_nat = tl.load(x_nat_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # torch.sign: +1, −1, and 0 for g == 0 (a zero gradient must not move the pixel).
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    delta = x_adv + alpha * sign - x_nat
    delta = _clamp(delta, -eps, eps)
    x = _clamp(x_nat + delta, 0.0, 1.0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _l2_shrink(sq, eps):
    """min(1, ε/‖δ‖) as the reference's _l2_shrink: torch.where(n > ε, ε / max(n, 1e-30), 1)."""
    n = tl.sqrt_rn(sq)
    return tl.where(n > eps, tl.div_rn(eps, tl.maximum(n, 1e-30, propagate_nan=tl.PropagateNan.ALL)), 1.0)


@triton.jit
def _pgd_step_l2_kernel(x_adv_ptr, grad_ptr, x_nat_ptr, out_ptr, row_numel, alpha, eps, grad_eps,
                        BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * row_numel
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        inb = cols < row_numel
        g = tl.load(grad_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        x_adv = tl.load(x_adv_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        x_nat = tl.load(x_nat_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        denom = tl.sqrt_rn(tl.sum(g * g, axis=0)) + grad_eps
        delta = x_adv - x_nat + alpha * tl.div_rn(g, denom)
        factor = _l2_shrink(tl.sum(delta * delta, axis=0), eps)
        x = _clamp(x_nat + delta * factor, 0.0, 1.0)
        tl.store(out_ptr + base + cols, x.to(out_ptr.dtype.element_ty), mask=inb)
    else:
        # Pass 1: ‖g‖². Lane-wise partial sums, one tree reduction at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, row_numel, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(grad_ptr + base + cols, mask=cols < row_numel, other=0.0).to(tl.float32)
            acc += g * g
        denom = tl.sqrt_rn(tl.sum(acc, axis=0)) + grad_eps
        # Pass 2: ‖δ'‖² with δ' = x_adv − x_nat + α·g/(‖g‖ + 1e-10).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, row_numel, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < row_numel
            g = tl.load(grad_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x_adv = tl.load(x_adv_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x_nat = tl.load(x_nat_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            delta = x_adv - x_nat + alpha * tl.div_rn(g, denom)
            acc += delta * delta
        factor = _l2_shrink(tl.sum(acc, axis=0), eps)
        # Pass 3: recompute δ' (bit-identical to pass 2) and write. In place (out is x_adv) is safe:
        # each element is read by this program before this program overwrites it.
        for start in range(0, row_numel, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < row_numel
            g = tl.load(grad_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x_adv = tl.load(x_adv_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x_nat = tl.load(x_nat_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            delta = x_adv - x_nat + alpha * tl.div_rn(g, denom)
            x = _clamp(x_nat + delta * factor, 0.0, 1.0)
            tl.store(out_ptr + base + cols, x.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _pgd_random_init_linf_kernel(x_nat_ptr, noise_ptr, out_ptr, n_elements, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    x_nat = tl.load(x_nat_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # Launched with NO_FMA: the reference rounds ε·noise before adding x_nat.
    x = _clamp(x_nat + eps * noise, 0.0, 1.0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _pgd_random_init_l2_kernel(x_nat_ptr, noise_ptr, radius_ptr, out_ptr, row_numel, eps,
                               BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * row_numel
    # δ0 = noise / max(‖noise‖, 1e-30) · (r·ε), the reference's operation order.
    r_eps = tl.load(radius_ptr + row).to(tl.float32) * eps
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        inb = cols < row_numel
        noise = tl.load(noise_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        x_nat = tl.load(x_nat_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt_rn(tl.sum(noise * noise, axis=0)), 1e-30, propagate_nan=tl.PropagateNan.ALL)
        x = _clamp(x_nat + tl.div_rn(noise, norm) * r_eps, 0.0, 1.0)
        tl.store(out_ptr + base + cols, x.to(out_ptr.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, row_numel, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            noise = tl.load(noise_ptr + base + cols, mask=cols < row_numel, other=0.0).to(tl.float32)
            acc += noise * noise
        norm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), 1e-30, propagate_nan=tl.PropagateNan.ALL)
        for start in range(0, row_numel, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inb = cols < row_numel
            noise = tl.load(noise_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x_nat = tl.load(x_nat_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            x = _clamp(x_nat + tl.div_rn(noise, norm) * r_eps, 0.0, 1.0)
            tl.store(out_ptr + base + cols, x.to(out_ptr.dtype.element_ty), mask=inb)


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def _check_images(ref_name, ref, **others):
    """Image tensors: contiguous, float, ≥ 1 dim; every one of `others` has ref's shape, dtype, device."""
    check_tensor(ref_name, ref, dtypes=FLOAT_DTYPES)
    if ref.dim() < 1:
        raise ValueError(f"{ref_name}: expected a (B, ...) tensor, got a 0-dim tensor")
    for name, t in others.items():
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=ref.device, shape=ref.shape)
        check_same_dtype(name, t, ref_name, ref)


def _l2_launch_params(row_numel):
    """(BLOCK, ONE_PASS, num_warps) for the one-program-per-example kernels."""
    if row_numel <= L2_ONE_PASS_MAX:
        block = max(triton.next_power_of_2(row_numel), 16)
        return block, True, 8 if block >= 2048 else 4
    return L2_STREAM_BLOCK, False, 4


def _check_step(x_adv, grad, x_nat, alpha, eps, norm, out=None):
    _check_norm(norm)
    _check_images("x_adv", x_adv, grad=grad, x_nat=x_nat, **({} if out is None else {"out": out}))


def _check_random_init(x_nat, noise, eps, norm, radius, out):
    _check_norm(norm)
    _check_images("x_nat", x_nat, out=out)
    check_tensor("noise", noise, dtypes=(torch.float32,), device=x_nat.device, shape=x_nat.shape)
    if norm == "l2":
        if radius is None:
            raise ValueError("radius: required for norm='l2', a (B,) fp32 tensor of U(0, 1) draws")
        check_tensor("radius", radius, dtypes=(torch.float32,), device=x_nat.device,
                     shape=(x_nat.shape[0],))


def _launch_step(x_adv, grad, x_nat, alpha, eps, norm, out):
    """Validate, then launch the step kernel of `norm` writing into `out` (which may be x_adv)."""
    _check_step(x_adv, grad, x_nat, alpha, eps, norm, out)
    if x_adv.numel() == 0:
        return
    if norm == "linf":
        n = x_adv.numel()
        grid = (triton.cdiv(n, LINF_BLOCK),)
        with _common.on_device(x_adv):
            _pgd_step_linf_kernel[grid](x_adv, grad, x_nat, out, n, alpha, eps, BLOCK=LINF_BLOCK, num_warps=4,
                                        **NO_FMA)
        return
    batch = x_adv.shape[0]
    row_numel = x_adv.numel() // batch
    block, one_pass, num_warps = _l2_launch_params(row_numel)
    with _common.on_device(x_adv):
        _pgd_step_l2_kernel[(batch,)](x_adv, grad, x_nat, out, row_numel, alpha, eps, L2_GRAD_EPS,
                                      BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps)


# The library ops (``torch.ops.rwp_triton.*``): the CUDA extension's schemas (csrc/bindings.cpp), opaque
# to torch.compile through their fake impls, so a compiled region holds them without a graph break. The
# fakes run the same argument checks: a meta (or fake) operand dispatches to the fake, not to the body.
# (``torch.library.triton_op`` would let Inductor see inside, but it traces the launch itself under fake
# tensors, which the Triton interpreter that CI runs on cannot do.)
@torch.library.custom_op("rwp_triton::pgd_step", mutates_args={"out"})
def _pgd_step_op(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, alpha: float, eps: float,
                 norm: str, out: torch.Tensor) -> None:
    _launch_step(x_adv, grad, x_nat, alpha, eps, norm, out)


@torch.library.custom_op("rwp_triton::pgd_step_", mutates_args={"x_adv"})
def _pgd_step_inplace_op(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, alpha: float, eps: float,
                         norm: str) -> None:
    # Each element is read before it is written by the same program, so out = x_adv is race-free.
    _launch_step(x_adv, grad, x_nat, alpha, eps, norm, x_adv)


@torch.library.custom_op("rwp_triton::pgd_random_init", mutates_args={"out"})
def _pgd_random_init_op(x_nat: torch.Tensor, noise: torch.Tensor, eps: float, norm: str,
                        radius: torch.Tensor | None, out: torch.Tensor) -> None:
    _check_random_init(x_nat, noise, eps, norm, radius, out)
    if x_nat.numel() == 0:
        return
    if norm == "linf":
        n = x_nat.numel()
        grid = (triton.cdiv(n, LINF_BLOCK),)
        with _common.on_device(x_nat):
            _pgd_random_init_linf_kernel[grid](x_nat, noise, out, n, eps, BLOCK=LINF_BLOCK, num_warps=4,
                                               **NO_FMA)
        return
    batch = x_nat.shape[0]
    row_numel = x_nat.numel() // batch
    block, one_pass, num_warps = _l2_launch_params(row_numel)
    with _common.on_device(x_nat):
        _pgd_random_init_l2_kernel[(batch,)](x_nat, noise, radius, out, row_numel, eps,
                                             BLOCK=block, ONE_PASS=one_pass, num_warps=num_warps)


_pgd_step_op.register_fake(_check_step)
_pgd_step_inplace_op.register_fake(_check_step)
_pgd_random_init_op.register_fake(_check_random_init)


def pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out):
    """Write the next PGD iterate into `out` and return it.

    x_adv, grad, x_nat, out: (B, ...) contiguous, same shape, same dtype (fp32, fp16 or bf16), same
    device. `out` may be `x_adv` itself (in-place step). alpha, eps: Python floats, pixel units.
    norm: 'linf' (bit-exact vs pgd_step_ref in fp32) or 'l2'.
    """
    _check_norm(norm)  # here too: the op's schema would refuse a non-str first, without naming the choices
    if out is x_adv:  # the out-of-place op's schema does not mark x_adv as written
        return pgd_step_(x_adv, grad, x_nat, alpha, eps, norm)
    torch.ops.rwp_triton.pgd_step(x_adv, grad, x_nat, float(alpha), float(eps), norm, out)
    return out


def pgd_step_(x_adv, grad, x_nat, alpha, eps, norm):
    """In-place PGD step: x_adv is overwritten with the next iterate and returned (see pgd_step)."""
    _check_norm(norm)
    torch.ops.rwp_triton.pgd_step_(x_adv, grad, x_nat, float(alpha), float(eps), norm)
    return x_adv


def pgd_random_init(x_nat, noise, eps, norm, radius, out):
    """Write the PGD random start into `out` and return it (see pgd_random_init_ref).

    x_nat, out: (B, ...) contiguous, same shape/dtype (fp32, fp16, bf16)/device; noise: same shape,
    fp32 (U(−1, 1) draws for 'linf', N(0, 1) for 'l2'); radius: (B,) fp32 U(0, 1) fractions of ε,
    required for 'l2', ignored for 'linf'. eps: Python float.
    """
    _check_norm(norm)
    if norm == "linf":
        radius = None  # ignored for L∞, whatever was passed
    elif radius is not None:
        check_tensor("radius", radius, dtypes=(torch.float32,), device=x_nat.device, shape=(x_nat.shape[0],))
    torch.ops.rwp_triton.pgd_random_init(x_nat, noise, float(eps), norm, radius, out)
    return out
