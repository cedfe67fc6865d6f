"""Fast attacks: the reference's PGD and TRADES loops on the fused ``pgd_step`` op, with no waste.

Same semantics and same random draws as ``rwp_fast.reference.attacks`` (the tests compare them):

* the start and every step go through ``rwp_fast.ops.pgd_step`` (sign step, projection and box clamp in
  one kernel, in place on the iterate);
* gradients are taken with respect to the input only, and the model's parameters are frozen
  (``requires_grad=False``) for the duration of the attack. In eager mode ``autograd.grad(loss, x)``
  already skips the weight-gradient convolutions, but a ``torch.compile``'d backward is traced for
  every input that requires grad and would compute them anyway; freezing makes both modes skip them
  (SPEC.md §6: ≈ K1·2 forward units instead of K1·3);
* no host synchronisation inside the loop;
* one step (``ascend_``) traces as one graph, which the training step compiles and captures.

``forward`` is the (possibly compiled) model; ``autocast`` a context manager factory for AMP.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..ops import pgd_random_init, pgd_step_
from ..core import TRADES_INIT_STD, draw, draw_random_init_noise, margin_loss, trades_kl_sum, upcast


@contextlib.contextmanager
def frozen(params):
    """Temporarily set requires_grad=False on `params` (input-only gradients), then restore it."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def objective(logits, y, loss):
    if loss == "ce":
        return F.cross_entropy(upcast(logits), y, reduction="sum")
    if loss == "cw":
        return margin_loss(logits, y).sum()
    raise ValueError(f"loss: expected 'ce' or 'cw', got {loss!r}")


def input_leaf(x):
    """The persistent leaf ``ascend_`` differentiates at: x's shape and strides, requires_grad, refilled each step."""
    return torch.empty_like(x).requires_grad_(True)


def ascend_(forward, x_adv, leaf, x, objective, alpha, eps, norm, autocast, pgd_step_):
    """One attack step in place: x_adv ← pgd_step(x_adv, ∇ₓ objective(forward(x_adv))).

    Traceable as one graph (``torch.compile(fullgraph=True)`` with Dynamo's ``trace_autograd_ops``): the
    training step compiles it, and captures the K1 calls of an attack. The gradient is taken at `leaf`
    (``input_leaf``), a persistent tensor that requires grad and is refilled from x_adv in place: Dynamo on
    torch 2.11 refuses ``x_adv.detach().requires_grad_()`` inside a graph (2.14 accepts it), and a leaf that
    is a graph input traces on both. pgd_step_: the op with its backend bound (``OpSet.pgd_step_``) or
    ``rwp_fast.ops.pgd_step_``.
    """
    with torch.no_grad():
        leaf.copy_(x_adv)
    with autocast():
        logits = forward(leaf)
    (grad,) = torch.autograd.grad(objective(logits), leaf)
    pgd_step_(x_adv, grad, x, alpha, eps, norm)


def pgd_attack(forward, x, y, eps, alpha, steps, norm="linf", random_start=True, loss="ce", generator=None,
               params=(), autocast=contextlib.nullcontext, input_only=True, backend=None):
    """PGD-`steps` on CE or the C&W margin; returns a detached x_adv (B, C, H, W) in [0, 1].

    params: the model's parameters, frozen during the attack when input_only is True. backend: of the
    ``pgd_step`` op (None: the process-wide choice, ``rwp_fast.ops.set_backend``).
    """
    if random_start:
        noise, radius = draw_random_init_noise(x, norm, generator)
        x_adv = pgd_random_init(x, noise, eps, norm, radius, backend=backend)
    else:
        x_adv = x.clone()
    step, leaf = functools.partial(pgd_step_, backend=backend), input_leaf(x_adv)
    with frozen(params) if input_only else contextlib.nullcontext():
        for _ in range(steps):
            ascend_(forward, x_adv, leaf, x, lambda logits: objective(logits, y, loss), alpha, eps, norm, autocast,
                    step)
    return x_adv.detach()


def trades_attack(forward, x, eps, alpha, steps, norm="linf", generator=None, params=(),
                  autocast=contextlib.nullcontext, input_only=True, backend=None):
    """TRADES KL attack from x + 0.001·N(0, 1), as ``trades_attack_ref``; returns a detached x_adv."""
    with torch.no_grad(), autocast():
        p_nat = F.softmax(upcast(forward(x)), dim=1)
    noise = draw(torch.randn, x.shape, generator, x.device)
    x_adv = (x + TRADES_INIT_STD * noise).to(x.dtype)
    step, leaf = functools.partial(pgd_step_, backend=backend), input_leaf(x_adv)
    with frozen(params) if input_only else contextlib.nullcontext():
        for _ in range(steps):
            ascend_(forward, x_adv, leaf, x, lambda logits: trades_kl_sum(logits, p_nat), alpha, eps, norm, autocast,
                    step)
    return x_adv.detach()
