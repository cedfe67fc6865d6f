"""Public op ``pgd_step``: one fused PGD step, and the PGD random start (SPEC.md §1).

Every function takes ``backend=None`` (None: ``dispatch.requested_backend()``; 'auto' picks per
device). The triton and cuda backends write into a caller-visible buffer; the torch backend is the
reference ``rwp_fast.reference.pgd_step``.
"""

import math

import torch

from ..reference.pgd_step import pgd_random_init_ref, pgd_step_ref
from . import dispatch

OP = "pgd_step"


def _check_radius(name, value, most=math.inf):
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name}: expected a number >= 0 (pixel units, e.g. 8/255), got {value}")
    if value > most:
        raise ValueError(f"{name}: {value:g} is in pixel units ([0, 1] images); did you pass 1/255 units? "
                         f"use {value:g}/255")
    return value


def _check_eps(eps, norm, x):
    """A radius past the [0, 1] box's own extent is the 255× mix-up with RunConfig.epsilon_255: 1 for L∞, the
    box's diameter √d for L2 (d values per example: 55 for CIFAR's 3·32·32, where 8 or 128 would be the mix-up
    but ImageNet's usual L2 ε = 3 is a real radius)."""
    d = x.numel() // x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else 1  # metadata only: no op per step
    return _check_radius("eps", eps, most=1.0 if norm == "linf" else math.sqrt(d))


def _channels_last(t):
    """True for a 4-D tensor stored channels-last (NHWC memory) that is not also NCHW-contiguous (C = 1, or
    H = W = 1, are both: the two orders are then one)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _new_like(x):
    """An output for the kernels in x's layout: channels-last if x is, else contiguous. Not empty_like, which
    keeps any strides (a transposed x's), where the kernels need a dense buffer in the layout they run in."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _kernel_views(written, *reads):
    """(written, *reads) as the kernels take them: contiguous tensors that share one storage order.

    The kernels are elementwise (L∞) or per-example reductions (L2) over each example's d = numel/B values,
    which are one contiguous block of storage in NCHW and in channels-last (NHWC) memory alike; so they
    run on the storage of any layout that every operand shares. With `written` (the tensor the kernel
    writes: out, or x_adv in place) channels-last, each operand goes in as its NHWC view
    ``t.permute(0, 2, 3, 1)``, contiguous, metadata only; a read operand in another layout is copied to
    channels-last first, and the written one is itself, so the kernel's writes land in the caller's
    tensor. Otherwise the read operands are made contiguous (a no-op where they are) and `written` goes
    as is (a non-contiguous one is refused by the kernel, naming it, not written into a copy). A shape
    mismatch takes the second path too, where the kernel's check names the operand in its own shape.
    """
    if _channels_last(written) and all(t is None or t.shape == written.shape for t in reads):
        return (written.permute(0, 2, 3, 1),
                *(None if t is None else t.permute(0, 2, 3, 1).contiguous() for t in reads))
    return (written, *(None if t is None else t.contiguous() for t in reads))


def pgd_step(x_adv, grad, x_nat, alpha, eps, norm="linf", out=None, backend=None):
    """Next PGD iterate clamp(x_nat + Π_ε(x_adv − x_nat + α·step(grad)), 0, 1), out of place.

    x_adv, grad, x_nat: (B, ...) same shape and dtype (fp32, fp16, bf16); alpha >= 0 and eps in pixel units
    (eps ≤ 1 for 'linf', ≤ √(values per example) for 'l2'); norm 'linf' or 'l2'. out: optional (B, ...)
    buffer to write into. Returns out (or a new tensor).

    Layouts: any, for every operand. The kernels run in out's layout (without `out`, x_adv's: a new out
    is channels-last when x_adv is); operands already in it are read where they are (no copy: a
    channels-last model's input gradient with a channels-last x_adv), others are copied to it.
    """
    alpha, eps = _check_radius("alpha", alpha), _check_eps(eps, norm, x_adv)
    name = dispatch.choose_backend(OP, x_adv.device, backend)
    if name == "torch":
        result = pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm)
        return result if out is None else out.copy_(result)
    if out is None:
        out = _new_like(x_adv)
    impl = dispatch.backend_module(name, OP)
    if out is x_adv:  # in place: the backend's own op, whose schema marks x_adv as written
        impl.pgd_step_(*_kernel_views(x_adv, grad, x_nat), alpha, eps, norm)
        return out
    out_k, x_adv_k, grad_k, x_nat_k = _kernel_views(out, x_adv, grad, x_nat)
    impl.pgd_step(x_adv_k, grad_k, x_nat_k, alpha, eps, norm, out_k)
    return out


def pgd_step_(x_adv, grad, x_nat, alpha, eps, norm="linf", backend=None):
    """In-place PGD step: x_adv is overwritten with the next iterate and returned.

    x_adv: contiguous or channels-last (the kernel writes into its storage); grad and x_nat may have any
    layout: in x_adv's they are read where they are (a channels-last model's input gradient with a
    channels-last x_adv: no copy), in another they are copied to x_adv's (one B·C·H·W copy each).
    """
    alpha, eps = _check_radius("alpha", alpha), _check_eps(eps, norm, x_adv)
    name = dispatch.choose_backend(OP, x_adv.device, backend)
    if name == "torch":
        return x_adv.copy_(pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm))
    # Its own backend entry (not pgd_step with out=x_adv): the CUDA op's schema must mark x_adv as written.
    dispatch.backend_module(name, OP).pgd_step_(*_kernel_views(x_adv, grad, x_nat), alpha, eps, norm)
    return x_adv


def pgd_random_init(x_nat, noise, eps, norm="linf", radius=None, backend=None):
    """Random start inside the ε-ball, box-clamped; a new tensor of x_nat's shape and dtype.

    noise: fp32, x_nat's shape (U(−1, 1) for 'linf', N(0, 1) for 'l2'); radius: (B,) fp32 U(0, 1) draws,
    'l2' only. ``rwp_fast.reference.draw_random_init_noise`` draws both. Any layout: the result has x_nat's
    (channels-last if x_nat is, else contiguous), and noise in another layout is copied to it.
    """
    eps = _check_eps(eps, norm, x_nat)
    name = dispatch.choose_backend(OP, x_nat.device, backend)
    if name == "torch":
        return pgd_random_init_ref(x_nat, noise, eps, norm, radius)
    out = _new_like(x_nat)
    out_k, x_nat_k, noise_k = _kernel_views(out, x_nat, noise)
    dispatch.backend_module(name, OP).pgd_random_init(x_nat_k, noise_k, eps, norm, radius, out_k)
    return out
