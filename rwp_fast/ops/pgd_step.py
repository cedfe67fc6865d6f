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


def _new_like(x):
    # Not empty_like: that keeps a non-contiguous input's strides, and the kernels need contiguous out.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def pgd_step(x_adv, grad, x_nat, alpha, eps, norm="linf", out=None, backend=None):
    """Next PGD iterate clamp(x_nat + Π_ε(x_adv − x_nat + α·step(grad)), 0, 1), out of place.

    x_adv, grad, x_nat: (B, ...) same shape and dtype (fp32, fp16, bf16); alpha >= 0 and eps in pixel units
    (eps ≤ 1 for 'linf', ≤ √(values per example) for 'l2'); norm 'linf' or 'l2'. out: optional (B, ...)
    buffer to write into. Returns out (or a new tensor).
    """
    alpha, eps = _check_radius("alpha", alpha), _check_eps(eps, norm, x_adv)
    name = dispatch.choose_backend(OP, x_adv.device, backend)
    if name == "torch":
        result = pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm)
        return result if out is None else out.copy_(result)
    if out is None:
        out = _new_like(x_adv)
    return dispatch.backend_module(name, OP).pgd_step(x_adv.contiguous(), grad.contiguous(), x_nat.contiguous(),
                                                      alpha, eps, norm, out)


def pgd_step_(x_adv, grad, x_nat, alpha, eps, norm="linf", backend=None):
    """In-place PGD step: x_adv (contiguous) is overwritten with the next iterate and returned.

    grad and x_nat may have any layout: with channels-last weights autograd returns a channels-last
    input gradient, which is copied to the contiguous layout the kernels read (one B·C·H·W copy).
    """
    alpha, eps = _check_radius("alpha", alpha), _check_eps(eps, norm, x_adv)
    name = dispatch.choose_backend(OP, x_adv.device, backend)
    if name == "torch":
        return x_adv.copy_(pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm))
    # Its own backend entry (not pgd_step with out=x_adv): the CUDA op's schema must mark x_adv as written.
    return dispatch.backend_module(name, OP).pgd_step_(x_adv, grad.contiguous(), x_nat.contiguous(), alpha, eps,
                                                       norm)


def pgd_random_init(x_nat, noise, eps, norm="linf", radius=None, backend=None):
    """Random start inside the ε-ball, box-clamped; a new tensor of x_nat's shape and dtype.

    noise: fp32, x_nat's shape (U(−1, 1) for 'linf', N(0, 1) for 'l2'); radius: (B,) fp32 U(0, 1) draws,
    'l2' only. ``rwp_fast.reference.draw_random_init_noise`` draws both.
    """
    eps = _check_eps(eps, norm, x_nat)
    name = dispatch.choose_backend(OP, x_nat.device, backend)
    if name == "torch":
        return pgd_random_init_ref(x_nat, noise, eps, norm, radius)
    out = _new_like(x_nat)
    return dispatch.backend_module(name, OP).pgd_random_init(x_nat, noise, eps, norm, radius, out)
