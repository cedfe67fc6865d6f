"""Reference for the fused op ``pgd_step``: one step of PGD, and its random start (SPEC.md §1).

Plain PyTorch, written for reading. The Triton kernel ``rwp_fast.kernels.pgd_step`` and the CUDA
kernel ``csrc/pgd_step.cu`` must reproduce these functions; the torch backend of
``rwp_fast.ops.pgd_step`` calls them directly.

All images are in pixel space [0, 1]. Arithmetic is done in fp32 whatever the input dtype, and the
result is cast back to the dtype of ``x_adv``. The L∞ step is a fixed sequence of fp32 operations, so a
kernel that does the same operations in the same order matches it bit for bit.
"""

import torch

from ..core import L2_GRAD_EPS, NORMS, BatchSlice, draw, draw_random_init_noise, upcast  # noqa: F401 (re-exports)


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def _row_norm(t):
    """Per-example L2 norm of a (B, ...) fp32 tensor, shape (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm="linf"):
    """One PGD ascent step with projection and box clamp; returns a new tensor.

    x_adv, grad, x_nat: (B, ...) tensors of the same shape; any float dtype.
    alpha, eps: Python floats, step size and radius in pixel units (8/255 is 0.0314).

    L∞:  δ = clamp(x_adv + α·sign(g) − x_nat, −ε, ε);  x = clamp(x_nat + δ, 0, 1).  sign(0) = 0.
    L2:  u = g / (‖g‖ + 1e-10);  δ = x_adv − x_nat + α·u;  δ ← δ·min(1, ε/‖δ‖);  x = clamp(x_nat + δ, 0, 1).
    """
    _check_norm(norm)
    out_dtype = x_adv.dtype
    x_adv, grad, x_nat = upcast(x_adv), upcast(grad), upcast(x_nat)
    if norm == "linf":
        delta = torch.clamp(x_adv + alpha * torch.sign(grad) - x_nat, -eps, eps)
    else:
        unit = grad / (_row_norm(grad) + L2_GRAD_EPS)
        delta = x_adv - x_nat + alpha * unit
        delta = delta * _l2_shrink(delta, eps)
    return torch.clamp(x_nat + delta, 0.0, 1.0).to(out_dtype)


def _l2_shrink(delta, eps):
    """Factor min(1, ε/‖δ‖) per example that projects δ onto the L2 ball; 1 where ‖δ‖ ≤ ε (incl. δ = 0)."""
    n = _row_norm(delta)
    return torch.where(n > eps, eps / torch.clamp(n, min=1e-30), torch.ones_like(n))


def pgd_random_init_ref(x_nat, noise, eps, norm="linf", radius=None):
    """Random start x_nat + δ0 inside the ε-ball, box-clamped. Returns a new tensor.

    The random numbers are inputs, so every backend maps the same draws to the same start:
      L∞: noise ~ U(−1, 1) elementwise, δ0 = ε·noise.
      L2: noise ~ N(0, 1) elementwise gives the direction and radius ~ U(0, 1) of shape (B,) the
          fraction of ε: δ0 = radius·ε·noise/‖noise‖ (SPEC.md §1).
    """
    _check_norm(norm)
    out_dtype = x_nat.dtype
    x_nat, noise = upcast(x_nat), noise.to(upcast(x_nat).dtype)
    if norm == "linf":
        delta = eps * noise
    else:
        if radius is None:
            raise ValueError("radius: required for norm='l2', a (B,) tensor of U(0, 1) draws")
        r = radius.to(x_nat.dtype).view(-1, *([1] * (noise.dim() - 1)))
        delta = noise / torch.clamp(_row_norm(noise), min=1e-30) * (r * eps)
    return torch.clamp(x_nat + delta, 0.0, 1.0).to(out_dtype)
