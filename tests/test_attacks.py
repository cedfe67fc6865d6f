"""The fast attacks (fused pgd_step, frozen weights) equal the reference attacks exactly."""

import pytest
import torch

from rwp_fast.attacks import pgd_attack, trades_attack
from rwp_fast.models import build_model
from rwp_fast.ops import dispatch
from rwp_fast.reference import pgd_attack_ref, trades_attack_ref
from rwp_fast.verify import tolerances


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("linf", "cw"), ("l2", "ce")])
def test_pgd_attack_matches_reference(backend, norm, loss, require_backend):
    require_backend(backend)
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,)).eval()
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 10, (7,))
    eps, alpha = (32 / 255, 8 / 255) if norm == "linf" else (0.5, 0.1)
    dispatch.set_backend(backend)
    try:
        fast = pgd_attack(model, x, y, eps, alpha, 5, norm, True, loss, torch.Generator().manual_seed(3),
                          params=list(model.parameters()))
    finally:
        dispatch.set_backend(None)
    ref = pgd_attack_ref(model, x, y, eps, alpha, 5, norm, True, loss, torch.Generator().manual_seed(3))
    if norm == "linf":
        assert torch.equal(fast, ref)
    else:
        # L2: each step of the kernel is within PGD_L2_ATOL of pgd_step_ref's on the same inputs (its row
        # norms sum in another order; tolerances.py). Projection onto ball ∩ box is non-expansive, so
        # earlier differences do not grow through it, and the input gradient moves by a second-order
        # amount for a 1e-6 move of x_adv: the 5 steps stay within 5·PGD_L2_ATOL. A wrong step is off
        # by ~α/√64 ≈ 1e-2 per pixel.
        assert torch.allclose(fast, ref, atol=5 * tolerances.PGD_L2_ATOL, rtol=0)
    assert not torch.equal(fast, x)  # the attack moved
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_trades_attack_matches_reference():
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,)).eval()
    x = torch.rand(5, 1, 8, 8)
    fast = trades_attack(model, x, 32 / 255, 8 / 255, 4, "linf", torch.Generator().manual_seed(1),
                         params=list(model.parameters()))
    ref = trades_attack_ref(model, x, 32 / 255, 8 / 255, 4, "linf", torch.Generator().manual_seed(1))
    assert torch.equal(fast, ref)


# ------------------------------------------------------------------ TRADES KL direction, closed form
def _linear_model(d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, classes, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(3 * torch.randn(classes, d, generator=g))
    return model.eval(), model[1].weight.detach().double()


def _closed_form_kl_grad(W, x_nat, x_adv):
    """For f(x) = Wx, p = softmax(W x_nat), q = softmax(W x_adv): KL(p ‖ q) = Σ p (log p − log q) and its
    gradient in x_adv, (q − p) W (per example), in fp64."""
    p = torch.softmax(x_nat.flatten(1).double() @ W.T, 1)
    q = torch.softmax(x_adv.flatten(1).double() @ W.T, 1)
    return (p * (p.log() - q.log())).sum(), ((q - p) @ W).view_as(x_adv)


def test_trades_kl_is_kl_of_natural_to_adversarial_in_closed_form():
    """trades_kl_sum(z_adv, p_nat) = KL(f(x) ‖ f(x_adv)), value and input gradient, far from x (near x the
    two directions of KL agree to first order, so only distant points tell them apart)."""
    from rwp_fast.reference.attacks import trades_kl_sum
    from rwp_fast.reference.lsc_loss import trades_per_example_ref
    model, W = _linear_model()
    x = torch.rand(5, 1, 1, 6)
    x_adv = (x + 0.8 * torch.randn_like(x)).requires_grad_(True)
    p_nat = torch.softmax(model(x).float(), 1)
    value = trades_kl_sum(model(x_adv), p_nat)
    (grad,) = torch.autograd.grad(value, x_adv)
    want_value, want_grad = _closed_form_kl_grad(W, x, x_adv.detach())
    assert value.item() == pytest.approx(want_value.item(), rel=1e-5)
    assert torch.allclose(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    # the training loss uses the same direction: ℓᵢ = CE(f(x), y) + β·KL(f(x) ‖ f(x_adv))
    y = torch.randint(0, 4, (5,))
    per = trades_per_example_ref(model(x), model(x_adv.detach()), y, 6.0)
    ce = torch.nn.functional.cross_entropy(model(x).double(), y, reduction="sum")
    assert per.sum().item() == pytest.approx((ce + 6.0 * want_value).item(), rel=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_trades_attack_steps_follow_the_closed_form_gradient(fast):
    """Two L∞ steps of size ε: the second starts far from x, where KL(p ‖ q) and KL(q ‖ p) point apart."""
    model, W = _linear_model(seed=1)
    x = 0.25 + 0.5 * torch.rand(16, 1, 1, 6)
    eps = alpha = 0.2
    gen = lambda: torch.Generator().manual_seed(5)
    if fast:
        out = trades_attack(model, x, eps, alpha, 2, "linf", gen(), params=list(model.parameters()))
    else:
        out = trades_attack_ref(model, x, eps, alpha, 2, "linf", gen())
    x_adv = x + 0.001 * torch.randn(x.shape, generator=gen())  # TRADES start, same draw as the attack
    for _ in range(2):
        _, g = _closed_form_kl_grad(W, x, x_adv)
        x_adv = torch.min(torch.max(x_adv + alpha * g.sign().float(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(out, x_adv, atol=1e-6)


def test_fgm_is_one_l2_step_of_length_eps_along_the_ce_gradient():
    """FGM, the L2 eval suite's one-step attack: x + ε·g/‖g‖₂ per example (g = ∇ₓCE), here away from the
    [0, 1] box so that the clamp does not bind: ‖x_adv − x‖₂ = ε exactly, along g."""
    from rwp_fast.reference import fgm_ref
    model, _ = _linear_model(seed=2)
    x, y = 0.4 + 0.2 * torch.rand(6, 1, 1, 6), torch.randint(0, 4, (6,))
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    out = fgm_ref(model, x, y, 0.1)
    step = (out - x).flatten(1)
    assert torch.allclose(step.norm(dim=1), torch.full((6,), 0.1), rtol=1e-5)
    assert torch.allclose(step, 0.1 * g.flatten(1) / g.flatten(1).norm(dim=1, keepdim=True), atol=1e-6)
