"""Reference attacks (SPEC.md §1, §3, §4): PGD (L∞, L2), FGSM (L∞), FGM (L2), the TRADES KL attack, C&W.

Plain PyTorch loops built on ``pgd_step_ref``. They take gradients with respect to the input only
(``torch.autograd.grad``), so no ``.grad`` of any model parameter is touched, and they never change the
model's train/eval mode: the caller sets it (AT attacks in train mode, TRADES/RST and evaluation in
eval mode, SPEC.md §1).

Attack losses are summed over the batch, not averaged: each example's input gradient is then
independent of the batch size. The sign (L∞) and the per-example normalisation (L2) make the step
itself independent of that choice.
"""

import torch
import torch.nn.functional as F

from .pgd_step import draw, draw_random_init_noise, pgd_random_init_ref, pgd_step_ref
from ..core import TRADES_INIT_STD, margin_loss, trades_kl_sum, upcast  # noqa: F401 (also the oracle's names)


def _input_grad(loss, x):
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd_attack_ref(model, x, y, eps, alpha, steps, norm="linf", random_start=True, loss="ce",
                   generator=None):
    """PGD-`steps` on CE (``loss='ce'``) or the C&W margin (``loss='cw'``); returns detached x_adv.

    x: (B, C, H, W) in [0, 1]; y: (B,) int64; eps, alpha in pixel units.
    """
    if random_start:
        noise, radius = draw_random_init_noise(x, norm, generator)
        x_adv = pgd_random_init_ref(x, noise, eps, norm, radius)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        if loss == "ce":
            objective = F.cross_entropy(upcast(logits), y, reduction="sum")
        elif loss == "cw":
            objective = margin_loss(logits, y).sum()
        else:
            raise ValueError(f"loss: expected 'ce' or 'cw', got {loss!r}")
        grad = _input_grad(objective, x_adv)
        x_adv = pgd_step_ref(x_adv.detach(), grad, x, alpha, eps, norm)
    return x_adv.detach()


def fgsm_ref(model, x, y, eps):
    """FGSM: x + ε·sign(∇ₓ CE), no random start, box-clamped (SPEC.md §1)."""
    x_req = x.detach().clone().requires_grad_(True)
    grad = _input_grad(F.cross_entropy(upcast(model(x_req)), y, reduction="sum"), x_req)
    # One L∞ step of size ε from x itself is exactly FGSM: the ε-clamp cannot bind.
    return pgd_step_ref(x, grad, x, eps, eps, "linf").detach()


def fgm_ref(model, x, y, eps):
    """FGM, the one-step L2 attack: x + ε·∇ₓCE/‖∇ₓCE‖₂ per example, no random start, box-clamped."""
    x_req = x.detach().clone().requires_grad_(True)
    grad = _input_grad(F.cross_entropy(upcast(model(x_req)), y, reduction="sum"), x_req)
    # One L2 step of length ε from x itself: the projection onto the ε-ball cannot bind.
    return pgd_step_ref(x, grad, x, eps, eps, "l2").detach()


def trades_attack_ref(model, x, eps, alpha, steps, norm="linf", generator=None):
    """TRADES inner maximisation of KL(f(x) ‖ f(x_adv)) from x + 0.001·N(0, 1). Returns detached x_adv."""
    with torch.no_grad():
        p_nat = F.softmax(upcast(model(x)), dim=1)
    noise = draw(torch.randn, x.shape, generator, x.device)
    x_adv = (x + TRADES_INIT_STD * noise).to(x.dtype)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        grad = _input_grad(trades_kl_sum(model(x_adv), p_nat), x_adv)
        x_adv = pgd_step_ref(x_adv.detach(), grad, x, alpha, eps, norm)
    return x_adv.detach()
