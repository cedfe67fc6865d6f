"""Semantic tests of the plain-PyTorch reference (SPEC.md §1–§3).

Every expected value is computed independently of the code under test: by hand, with a second plain
formula written here, or on a linear model whose gradients are analytic.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwp_fast.config import RunConfig
from rwp_fast.reference import (lsc_loss_ref, lsc_loss_trades_ref, perturbed_parameters, pgd_step_ref,
                                pgd_random_init_ref, train_step_ref, weight_perturbation_search_ref)


def tiny_bn_net(in_ch=1, classes=3):
    """conv → BN → ReLU → linear: two perturbable weights, plus BN affine params, a bias and buffers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_ch, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, classes))


def batch(n=16, in_ch=1, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, in_ch, 4, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------- PGD step
def test_linf_step_by_hand():
    x_nat = torch.tensor([[0.50, 0.50, 0.99, 0.01, 0.30]])
    x_adv = torch.tensor([[0.52, 0.50, 0.99, 0.01, 0.31]])
    grad = torch.tensor([[1.0, 0.0, 5.0, -2.0, -0.0]])
    out = pgd_step_ref(x_adv, grad, x_nat, alpha=0.02, eps=0.03)
    # 0.52+0.02 → δ 0.04 clipped to 0.03; sign(0) = 0 keeps 0.50; 0.99+0.02 → box 1.0;
    # 0.01−0.02 → box 0.0; sign(−0) = 0 keeps 0.31.
    expected = torch.tensor([[0.53, 0.50, 1.00, 0.00, 0.31]])
    assert torch.allclose(out, expected, atol=1e-7, rtol=0)
    assert out[0, 1] == x_adv[0, 1] and out[0, 4] == x_adv[0, 4]  # sign(0) = 0 exactly


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 128 / 255, 15 / 255)])
def test_steps_stay_in_ball_and_box(norm, eps, alpha):
    torch.manual_seed(3)
    x_nat = torch.rand(7, 3, 5, 5)
    x_adv = x_nat.clone()
    drift = torch.randn_like(x_nat)  # a persistent ascent direction, so the iterate reaches the boundary
    for _ in range(30):  # many steps along large noisy gradients must never leave the set
        x_adv = pgd_step_ref(x_adv, (drift + 0.3 * torch.randn_like(x_nat)) * 100, x_nat, alpha, eps, norm)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        d = (x_adv - x_nat).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= eps * (1 + 1e-6)).all()
    # the constraint binds: after 30 steps of α the iterate is on the sphere for most examples
    assert (size > 0.9 * eps).sum() >= 4


def test_l2_step_by_hand():
    x_nat = torch.full((1, 4), 0.5)
    grad = torch.tensor([[3.0, 4.0, 0.0, 0.0]])          # ‖g‖ = 5, unit = (0.6, 0.8, 0, 0)
    out = pgd_step_ref(x_nat, grad, x_nat, alpha=0.1, eps=1.0, norm="l2")
    assert torch.allclose(out, torch.tensor([[0.56, 0.58, 0.5, 0.5]]), atol=1e-7)
    out = pgd_step_ref(x_nat, grad, x_nat, alpha=0.1, eps=0.05, norm="l2")  # ‖δ‖ = 0.1 > ε: halve
    assert torch.allclose(out, torch.tensor([[0.53, 0.54, 0.5, 0.5]]), atol=1e-7)
    zero = pgd_step_ref(x_nat, torch.zeros_like(grad), x_nat, alpha=0.1, eps=1.0, norm="l2")
    assert torch.equal(zero, x_nat)  # zero gradient: no step, no NaN


def test_random_init_in_ball():
    x = torch.rand(9, 3, 4, 4)
    u = torch.rand_like(x) * 2 - 1
    out = pgd_random_init_ref(x, u, 0.1, "linf")
    assert torch.equal(out, torch.clamp(x + 0.1 * u, 0, 1))
    r = torch.rand(9)
    out = pgd_random_init_ref(x, torch.randn_like(x), 0.5, "l2", r)
    unclamped_norm = r * 0.5
    assert ((out - x).flatten(1).norm(dim=1) <= unclamped_norm + 1e-6).all()


# ------------------------------------------------------------------------------------------- LSC mask
def logits_with_ce(values, classes=4):
    """Logits whose CE against class 0 equals each value exactly enough: z = (0, b, b, b)."""
    # CE = log(1 + (C−1)e^b) ⇒ b = log((e^CE − 1)/(C−1))
    ce = torch.tensor(values, dtype=torch.float64)
    b = torch.log((torch.exp(ce) - 1) / (classes - 1))
    z = torch.zeros(len(values), classes, dtype=torch.float64)
    z[:, 1:] = b[:, None]
    return z.float(), torch.zeros(len(values), dtype=torch.long)


def test_mask_is_strict_at_c_min_and_mean_divides_by_n():
    logits, y = logits_with_ce([0.5, 1.0, 2.0, 3.0])
    per = F.cross_entropy(logits, y, reduction="none")
    c_min = per[2].item()  # exactly the loss of example 2, as computed in fp32
    mean, loss, mask, count = lsc_loss_ref(logits, y, 0.0, c_min)
    assert mask.tolist() == [True, True, False, False]  # ℓ = c_min is outside [0, c_min)
    assert count.item() == 2
    assert mean.item() == pytest.approx((0.5 + 1.0) / 4, rel=1e-5)  # divides by n = 4, not by 2
    p = per[1].item()  # exactly the loss of example 1, as computed in fp32: the lower bound is inclusive
    _, _, mask_p, _ = lsc_loss_ref(logits, y, p, math.inf)
    assert mask_p.tolist() == [False, True, True, True]
    p_up = torch.nextafter(per[1], torch.tensor(math.inf)).item()  # one fp32 ulp above ℓ₁
    _, _, mask_above, _ = lsc_loss_ref(logits, y, p_up, math.inf)
    assert mask_above.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="p <= q"):
        lsc_loss_ref(logits, y, 2.0, 1.0)


def test_masked_mean_gradient_is_zero_for_masked_out_rows():
    logits, y = logits_with_ce([0.5, 3.0])
    logits.requires_grad_(True)
    mean, *_ = lsc_loss_ref(logits, y, 0.0, 1.7)
    mean.backward()
    expected_row0 = (F.softmax(logits.detach()[0], 0) - F.one_hot(y[0], 4)) / 2
    assert torch.allclose(logits.grad[0], expected_row0, atol=1e-7)
    assert torch.equal(logits.grad[1], torch.zeros(4))


def test_trades_mask_loss_is_ce_plus_beta_sum_kl():
    torch.manual_seed(5)
    zn, za, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    _, loss, _, _ = lsc_loss_trades_ref(zn, za, y, beta=6.0)
    pn, pa = zn.softmax(1), za.softmax(1)
    expected = -pn.log()[torch.arange(6), y] + 6.0 * (pn * (pn.log() - pa.log())).sum(1)
    assert torch.allclose(loss, expected, atol=1e-5)


# -------------------------------------------------------------------------------- weight perturbation
def linear_problem(n=5, d=3, c=2, seed=0):
    """A bias-free linear classifier: ∂CE/∂W = (softmax(Wx) − onehot)ᵀ x / n is analytic."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, c, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g))
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    return model, x, y


def analytic_grad(W, x, y, mask):
    p = torch.softmax(x @ W.T, dim=1)
    return ((p - F.one_hot(y, W.shape[0])) * mask[:, None]).T @ x / x.shape[0]


def ce_of(x, y):
    return lambda m: F.cross_entropy(m(x), y, reduction="none")


@pytest.mark.parametrize("update", ["accumulate", "paper"])
def test_rwp_on_linear_model_matches_hand_derivation(update):
    # float64: an algorithm check, whose only rounding is then ~1e-16 per op on any CPU
    model, x, y = linear_problem()
    model, x = model.double(), x.double()
    W0 = model.weight.detach().clone()
    gamma, c_min, k2 = 0.5, 0.9, 3
    v, info = weight_perturbation_search_ref(model, ce_of(x, y), gamma, k2, (0.0, c_min), update, "layer")
    # the same algorithm, written from Algorithm 1 with the analytic gradient
    v_exp, a = torch.zeros_like(W0), torch.zeros_like(W0)
    steps = 0
    for _ in range(k2):
        W = W0 + v_exp
        loss = F.cross_entropy(x @ W.T, y, reduction="none")
        # the mask is discontinuous: no loss near c_min, so fp64 rounding cannot flip it (by construction)
        assert (loss - c_min).abs().min() > 1e-6
        mask = (loss < c_min).double()
        if mask.sum() == 0:
            break
        g = analytic_grad(W, x, y, mask)
        steps += 1
        d = (a := a + g) if update == "accumulate" else v_exp + g
        v_exp = gamma * W0.norm() * d / (d.norm() + 1e-20)
    assert steps >= 2  # the case exercises more than one probe
    assert info.steps_taken == steps
    # fp64, 3 probes of ~10 ops each, every one well conditioned (v = γ‖w‖·d/‖d‖ has condition ~1):
    # ≲ 30·2⁻⁵³ ≈ 3e-15 relative; 1e-12 leaves 300×. A wrong rule is off by O(1).
    assert (v[0] - v_exp).norm() <= 1e-12 * v_exp.norm()
    assert torch.equal(model.weight.detach(), W0)  # parameters left unperturbed


def test_update_rules_coincide_at_k2_1_and_differ_from_k2_2():
    model, x, y = linear_problem(n=8, d=4, c=3, seed=2)
    run = lambda rule, k2: weight_perturbation_search_ref(model, ce_of(x, y), 0.3, k2, (0.0, math.inf),
                                                          rule, "layer")[0][0]
    assert torch.equal(run("accumulate", 1), run("paper", 1))
    assert not torch.allclose(run("accumulate", 2), run("paper", 2), rtol=1e-4)


def test_early_break_with_c_min_below_every_loss_equals_plain_at():
    cfg = RunConfig(method="at", perturb="rwp", gamma=0.01, c_min=1e-6, k2=10, lr=0.1, momentum=0.9)
    x, y = batch()
    x_adv = x.clone()
    nets, results = [], []
    for perturb in ("rwp", "none"):
        net = tiny_bn_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        results.append(train_step_ref(net, opt, x, y, cfg.replace(perturb=perturb), x_adv=x_adv))
        nets.append(net)
    rwp, plain = results
    assert rwp.search.steps_taken == 0 and rwp.search.mask_fractions == [0.0]
    assert all(torch.equal(vi, torch.zeros_like(vi)) for vi in rwp.v)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)  # bit for bit: no rounding from adding and removing v
    assert rwp.loss == plain.loss


def test_awp_is_one_layerwise_full_mask_step():
    net = tiny_bn_net()
    x, y = batch()
    cfg = RunConfig(perturb="awp", gamma=0.02)
    v, info = weight_perturbation_search_ref(net, ce_of(x, y), cfg.gamma, cfg.effective_k2, cfg.lsc_range,
                                             "accumulate", "layer")
    assert info.steps_taken == 1
    # second formula: v_l = γ‖w_l‖ g_l/‖g_l‖, g = ∇ of the full batch-mean CE in train mode
    params = [p for _, p in perturbed_parameters(net)]
    state = {k: t.clone() for k, t in net.state_dict().items()}
    grads = torch.autograd.grad(F.cross_entropy(net.train()(x), y), params)
    net.load_state_dict(state)
    for vi, p, g in zip(v, params, grads):
        assert torch.allclose(vi, 0.02 * p.norm() * g / g.norm(), rtol=1e-5, atol=1e-8)
        assert vi.norm().item() == pytest.approx(0.02 * p.norm().item(), rel=1e-5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_norm_scopes(scope):
    net = tiny_bn_net()
    x, y = batch()
    gamma = 0.05
    v, _ = weight_perturbation_search_ref(net, ce_of(x, y), gamma, 3, (0.0, math.inf), "accumulate", scope)
    w = [p.detach() for _, p in perturbed_parameters(net)]
    if scope == "layer":
        for vi, wi in zip(v, w):
            assert vi.norm().item() == pytest.approx(gamma * wi.norm().item(), rel=1e-5)
    else:
        total_v = math.sqrt(sum(vi.pow(2).sum().item() for vi in v))
        total_w = math.sqrt(sum(wi.pow(2).sum().item() for wi in w))
        assert total_v == pytest.approx(gamma * total_w, rel=1e-5)
        per_layer = [vi.norm().item() / (gamma * wi.norm().item()) for vi, wi in zip(v, w)]
        assert max(abs(r - 1) for r in per_layer) > 1e-3  # not the layer rule by accident


def test_only_weights_with_dim_above_one_are_perturbed_and_buffers_untouched():
    net = tiny_bn_net()
    names = [n for n, _ in perturbed_parameters(net)]
    assert names == ["0.weight", "4.weight"]  # conv and linear; not BN weight (dim 1) nor biases
    x, y = batch()
    net.train()(x)  # make the running stats non-trivial first
    before = {k: t.clone() for k, t in net.state_dict().items()}
    weight_perturbation_search_ref(net, ce_of(x, y), 0.1, 5, (0.0, math.inf), "accumulate", "layer")
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k  # running stats and num_batches_tracked bit-identical


def test_sgd_step_acts_at_w_plus_v_then_removes_v():
    net = tiny_bn_net()
    x, y = batch()
    lr, wd = 0.1, 5e-4
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0, weight_decay=wd)
    cfg = RunConfig(perturb="awp", gamma=0.05, lr=lr, momentum=0.0, weight_decay=wd)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers0 = {k: b.clone() for k, b in net.named_buffers()}
    res = train_step_ref(net, opt, x, y, cfg, x_adv=x)
    # independent recomputation: gradient at w + v (train mode, from the same BN buffers)
    twin = tiny_bn_net()
    state = {**{n: w0[n] for n in w0}, **buffers0}
    twin.load_state_dict(state)
    v = dict(zip([n for n, _ in perturbed_parameters(twin)], res.v))
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.add_(v.get(n, torch.zeros_like(p)))
    loss = F.cross_entropy(twin.train()(x), y)
    grads = dict(zip([n for n, _ in twin.named_parameters()],
                     torch.autograd.grad(loss, list(twin.parameters()))))
    assert res.loss == pytest.approx(loss.item(), rel=1e-6)
    for n, p in net.named_parameters():
        vn = v.get(n, torch.zeros_like(p))
        wv = w0[n] + vn
        expected = wv - lr * (grads[n] + wd * wv) - vn
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7), n
    assert any(vi.abs().sum() > 0 for vi in res.v)
