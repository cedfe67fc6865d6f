"""Reference weight-perturbation search: RWP (Algorithm 1) and AWP, over a list of parameters.

SPEC.md §2. Plain PyTorch with one tensor per layer; readability over speed. The fast path
(``rwp_fast.perturb``) does the same over a flat buffer with the ``weight_perturb`` op.

Which weights: parameters named ``*weight`` with dim > 1 (conv and linear). BatchNorm affine
parameters, biases and buffers are never perturbed. ‖w‖ is measured once, on the unperturbed weights.

Each probe runs the model in train mode at w + v (batch statistics, as the released code's proxy
copies do). The probes must not change the model's BatchNorm running statistics, so every buffer is
snapshotted before the search and copied back after it.
"""

import math

import torch

from ..core import NORM_SCOPES, SCALE_EPS, UPDATE_RULES, SearchInfo, perturbed_parameters, upcast
from .lsc_loss import lsc_mask_ref


def _rescale(direction, w_norms, gamma, scope):
    """v_l = γ‖w_l‖·d_l/(‖d_l‖ + 1e-20) per tensor, or with one global norm of w and of d."""
    if scope == "layer":
        return [gamma * wn * d / (d.norm() + SCALE_EPS) for d, wn in zip(direction, w_norms)]
    w_norm = torch.sqrt(sum(wn ** 2 for wn in w_norms))
    d_norm = torch.sqrt(sum(d.pow(2).sum() for d in direction))
    return [gamma * w_norm * d / (d_norm + SCALE_EPS) for d in direction]


@torch.no_grad()
def _set_weights(params, w_unperturbed, v=None):
    """w ← w_unperturbed (+ v): restoring by copy leaves the weights bit-identical after the search."""
    for i, (p, w) in enumerate(zip(params, w_unperturbed)):
        p.copy_(w if v is None else w + v[i])


@torch.no_grad()
def add_perturbation(params, v, sign=1):
    """w ← w + sign·v in place, for every perturbed tensor."""
    for p, vi in zip(params, v):
        p.add_(vi, alpha=sign)


def weight_perturbation_search_ref(model, per_example_loss, gamma, k2, lsc_range=(-math.inf, math.inf),
                                   update="accumulate", scope="layer"):
    """Find v by K2 masked ascent steps (Algorithm 1). Returns (v: list of tensors, SearchInfo).

    per_example_loss: callable model -> (B,) fp32 losses, differentiable w.r.t. the weights.
    lsc_range: the LSC range [p, q); RWP is [0, c_min), AWP is (−inf, inf) (no mask) with k2 = 1.
    update: 'accumulate' (released code: a ← a + g, v = γ‖w‖a/‖a‖) or 'paper' (v ← v + g, renormalise).
    scope: 'layer' (‖v_l‖ = γ‖w_l‖) or 'global' (‖v‖ = γ‖w‖).
    The model's parameters are left unperturbed and its buffers unchanged on return.
    """
    if update not in UPDATE_RULES:
        raise ValueError(f"update: expected one of {UPDATE_RULES}, got {update!r}")
    if scope not in NORM_SCOPES:
        raise ValueError(f"scope: expected one of {NORM_SCOPES}, got {scope!r}")
    params = [p for _, p in perturbed_parameters(model)]
    w_unperturbed = [p.detach().clone() for p in params]
    w_norms = [upcast(p.detach()).norm() for p in params]
    v = [torch.zeros_like(p) for p in params]
    running_sum = [torch.zeros_like(p) for p in params]
    info = SearchInfo()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        for _ in range(k2):
            _set_weights(params, w_unperturbed, v)
            try:
                losses = per_example_loss(model)
                mask = lsc_mask_ref(losses.detach(), *lsc_range)
                info.mask_fractions.append(mask.float().mean().item())
                if not mask.any():
                    break  # exact: with no example in range, g = 0 and v cannot change any more
                objective = (losses * mask.to(losses.dtype)).sum() / losses.shape[0]
                grads = torch.autograd.grad(objective, params, allow_unused=True)
            finally:
                _set_weights(params, w_unperturbed)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            info.steps_taken += 1
            if update == "accumulate":
                running_sum = [a + g for a, g in zip(running_sum, grads)]
                direction = running_sum
            else:
                direction = [vi + g for vi, g in zip(v, grads)]
            v = _rescale(direction, w_norms, gamma, scope)
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        model.train(was_training)
    w_total = torch.sqrt(sum(wn ** 2 for wn in w_norms))
    v_total = torch.sqrt(sum(upcast(vi).pow(2).sum() for vi in v))
    info.v_norm_ratio = (v_total / w_total).item() if w_total > 0 else 0.0
    return [vi.detach() for vi in v], info
