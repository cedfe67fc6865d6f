"""A training step with the structure of the authors' released AT-AWP / AT-RWP code: the benchmark baseline.

``ReleasedTrainStep`` has ``train_step_ref``'s call signature and computes the same algorithm (SPEC.md §2;
``tests/test_bench_e2e.py`` holds its v to ``weight_perturbation_search_ref`` at rtol 1e-3), but it does
the work the way the released code does, so that ``bench/bench_e2e.py`` can time "the released
implementation" in the same run as the fast path (SPEC.md §6: speed claims are relative to a baseline
timed in the same run). Modelled on ``AT_AWP_RWP/train_cifar10.py`` and ``utils_rwp.py`` of the
released RWP code, and ``utils_awp.py`` of the AWP code it builds on.

Facts of the released code that this step reproduces:
  * fp32 everywhere, eager, contiguous (NCHW) tensors; no autocast, no compile;
  * PGD (``attack_pgd``): δ ~ U(−ε, ε), clamped so x + δ ∈ [0, 1]; each step calls ``loss.backward()``
    on the batch-mean CE with the model's weights requiring grad, so the weight gradients are computed
    too (≈ K1·3 forward units, SPEC.md §6) and pile up in ``.grad`` until ``opt.zero_grad()``; then δ is
    stepped in place and ``delta.grad.zero_()``. After the loop one more forward on x + δ (with an
    autograd graph) selects the best restart (``max_delta[all_loss >= max_loss] = …``, one restart);
    the attack runs in train mode, so every attack forward moves the BN running statistics;
  * RWP (``RobustWeightPerturb.calc_awp``): two proxy models, ``proxy_1`` and ``proxy_2``, both
    refreshed by ``load_state_dict(model.state_dict())`` on EVERY one of the K2 iterations, both
    shifted to w + v by a per-layer Python loop (``add_into_weights``); ``proxy_2`` runs the probe in
    train mode, the loss is ``-(CE(reduction='none') · 1[ℓ < c_min]).mean()`` (strict ``<``, mean over
    the whole batch), and an SGD step with lr 0.01 (no momentum, no weight decay) moves it; the step's
    gradient is recovered as the fp32 difference ``proxy_2 − proxy_1`` of the two copies, layer by layer
    over the state dict (``diff_in_weights``), so the lr cancels but costs ~3e-4 relative rounding;
  * the running sum a ← a + Δ and v = γ‖w‖·a/(‖a‖ + 1e-20) with ONE GLOBAL norm (``add_into_diff``:
    ``torch.cat`` of every diff and every weight, each iteration), ‖w‖ on the unperturbed model;
  * no early break: all K2 iterations run even when the mask is empty (the released loop is a plain
    ``for ii in range(10)``); an empty mask gives a zero gradient, so v is the same as with the break;
  * the probes run on the proxies, so the model's BN running statistics are untouched by them; the final
    training forward at w + v (on the model) updates them;
  * ``perturb``/``restore`` add ±γ·diff_scale into the model with a per-layer loop around the usual
    ``opt.zero_grad(); loss.backward(); opt.step()``; ``robust_loss.item()`` is read every step (the
    released loop logs it);
  * AWP (``AdvWeightPerturb.calc_awp``): one proxy, ``load_state_dict`` once, ``-CE.mean()``, one SGD
    step with lr 0.01, then ``diff_in_weights(model, proxy)`` normalises each layer:
    ‖w_l‖/(‖d_l‖ + 1e-20)·d_l.

Parametrised beyond the released code (so the benchmark compares like with like): K2 and c_min come from
the config (the released script hardcodes 10 and 1.7), and ``norm_scope`` picks the global norm of
released RWP or the per-layer norm of AWP for either method. Not modelled: ``nn.DataParallel`` (one
GPU), the DataLoader, mixup, L2 attacks, TRADES/RST (the AT scripts only). The optimizer is today's
``torch.optim.SGD`` (its default multi-tensor implementation on CUDA), not the 2020 per-parameter loop.
"""

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F

from rwp_fast.core import SearchInfo, StepResult, draw_random_init_noise

EPS = 1e-20       # released utils_awp.py / utils_rwp.py
PROXY_LR = 0.01   # released train_cifar10.py: proxy_opt = SGD(proxy.parameters(), lr=0.01); cancels in v
SCOPES = ("global", "layer")


# ------------------------------------------------------------------------ the released helper functions
def diff_in_weights(proxy_1, proxy_2):
    """OrderedDict name → proxy_2 − proxy_1 for every state-dict entry with 'weight' in its name and dim > 1
    (released ``utils_rwp.diff_in_weights``: a Python loop over both state dicts)."""
    diff = OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(proxy_1.state_dict().items(), proxy_2.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff[old_k] = new_w - old_w
    return diff


def _scaled(model, diff, names, scope):
    """diff_scale[name] = ‖w‖/(‖a‖ + EPS)·a[name]: one global norm (released RWP) or per layer (AWP)."""
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    out = OrderedDict()
    if scope == "global":
        # As released: torch.cat of every direction and every weight, outside no_grad (the cat of the
        # weights records an autograd node; nothing ever differentiates it).
        diff_all = torch.cat([diff[n].view(-1) for n, _ in params])
        w_all = torch.cat([p.view(-1) for _, p in params])
        scale_value = w_all.norm() / (diff_all.norm() + EPS)
        for n, _ in params:
            out[n] = scale_value * diff[n]
    else:
        for n, p in params:
            out[n] = p.norm() / (diff[n].norm() + EPS) * diff[n]
    return out


def add_into_diff(model, diff_step, diff, scope="global"):
    """a ← a + Δ (a starts as the first Δ) and the rescaled direction (released ``add_into_diff``)."""
    if not diff:
        diff = diff_step
    else:
        for name in diff_step.keys():
            diff[name] = diff[name] + diff_step[name]
    return diff, _scaled(model, diff, diff_step.keys(), scope)


def add_into_weights(model, diff, coeff=1.0):
    """param += coeff·diff[name], one Python iteration (two launches) per layer (released helper)."""
    names_in_diff = diff.keys()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names_in_diff:
                param.add_(coeff * diff[name])


# ------------------------------------------------------------------------------------- the adversaries
class ReleasedRWP:
    """``RobustWeightPerturb``: two proxy copies of `model`, K2 masked ascent steps, global norm."""

    def __init__(self, model, gamma, k2, c_min, scope="global"):
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        self.model, self.gamma, self.k2, self.c_min, self.scope = model, gamma, k2, c_min, scope
        self.proxy_1 = copy.deepcopy(model)
        self.proxy_2 = copy.deepcopy(model)
        self.proxy_2_optim = torch.optim.SGD(self.proxy_2.parameters(), lr=PROXY_LR)

    def calc(self, x_adv, y):
        """diff_scale (OrderedDict name → tensor); the perturbation is v = γ·diff_scale."""
        diff, diff_scale = OrderedDict(), OrderedDict()
        for _ in range(self.k2):  # no early break, as released
            self.proxy_1.load_state_dict(self.model.state_dict())
            self.proxy_2.load_state_dict(self.model.state_dict())
            add_into_weights(self.proxy_1, diff_scale, coeff=self.gamma)
            add_into_weights(self.proxy_2, diff_scale, coeff=self.gamma)
            self.proxy_2.train()
            output = self.proxy_2(x_adv)
            loss = F.cross_entropy(output, y, reduction="none")
            indicator = (loss < self.c_min).float()
            loss = -1 * loss.mul(indicator).mean()
            self.proxy_2_optim.zero_grad()
            loss.backward()
            self.proxy_2_optim.step()
            diff_step = diff_in_weights(self.proxy_1, self.proxy_2)
            diff, diff_scale = add_into_diff(self.model, diff_step, diff, self.scope)
        return diff_scale

    def perturb(self, diff_scale):
        add_into_weights(self.model, diff_scale, coeff=self.gamma)

    def restore(self, diff_scale):
        add_into_weights(self.model, diff_scale, coeff=-self.gamma)


class ReleasedAWP:
    """``AdvWeightPerturb``: one proxy, one ascent step on the mean CE, per-layer norm (as released)."""

    def __init__(self, model, gamma, scope="layer"):
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        self.model, self.gamma, self.scope = model, gamma, scope
        self.proxy = copy.deepcopy(model)
        self.proxy_optim = torch.optim.SGD(self.proxy.parameters(), lr=PROXY_LR)

    def calc(self, x_adv, y):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -F.cross_entropy(self.proxy(x_adv), y)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        diff = diff_in_weights(self.model, self.proxy)  # the AWP helper differences model and proxy
        return _scaled(self.model, diff, diff.keys(), self.scope)

    perturb = ReleasedRWP.perturb
    restore = ReleasedRWP.restore


# ------------------------------------------------------------------------------------------- the attack
def attack_pgd_released(model, x, y, eps, alpha, steps, generator=None):
    """The released ``attack_pgd`` (L∞, one restart, no early stop); returns x_adv (B, C, H, W) fp32.

    Random start from ``draw_random_init_noise`` (U(−1, 1), as the reference draws it) instead of
    ``delta.uniform_``, so both attacks can start from the same point.
    """
    noise, _ = draw_random_init_noise(x, "linf", generator)
    delta = noise * eps
    delta = torch.clamp(delta, -x, 1 - x)  # clamp(delta, lower_limit - X, upper_limit - X)
    delta.requires_grad = True
    for _ in range(steps):
        output = model(x + delta)
        loss = F.cross_entropy(output, y)
        loss.backward()  # weight gradients too: the released code never freezes the model
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
        d = torch.clamp(d, -x, 1 - x)
        delta.data = d.detach()
        delta.grad.zero_()
    # restart selection (restarts = 1): one more forward, with an autograd graph, and a boolean gather
    max_loss = torch.zeros(y.shape[0], device=x.device)
    max_delta = torch.zeros_like(x)
    all_loss = F.cross_entropy(model(x + delta), y, reduction="none")
    max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
    return torch.clamp(x + max_delta, min=0, max=1).detach()


# ---------------------------------------------------------------------------------------- the step
class ReleasedTrainStep:
    """Callable(model, optimizer, x, y, cfg, perturb_active, generator, x_adv) -> StepResult.

    Bound to `model` and `cfg` (it builds the proxy copies once, as the released script does). AT only,
    L∞ only, LSC range [0, c_min) (the released mask has no lower bound). ``StepResult.v`` holds v (one
    tensor per perturbed weight) when ``keep_v`` is set, else None; ``StepResult.search.steps_taken``
    is the number of probes run (always K2 for RWP: no early break).
    """

    def __init__(self, model, cfg):
        if cfg.method != "at":
            raise ValueError(f"method: the released baseline models the AT scripts only, got {cfg.method!r}")
        if cfg.norm != "linf":
            raise ValueError(f"norm: the released baseline models the L-inf attack only, got {cfg.norm!r}")
        if cfg.lsc_low != 0:
            raise ValueError(f"lsc_low: the released mask is 1[loss < c_min] with no lower bound, got "
                             f"{cfg.lsc_low}")
        if cfg.perturb == "rwp" and cfg.rwp_update != "accumulate":
            raise ValueError(f"rwp_update: the released code accumulates, got {cfg.rwp_update!r}")
        self.model, self.cfg = model, cfg
        self.adversary = None
        if cfg.perturb == "rwp":
            self.adversary = ReleasedRWP(model, cfg.gamma, cfg.k2, cfg.c_min, cfg.norm_scope)
        elif cfg.perturb == "awp":
            self.adversary = ReleasedAWP(model, cfg.gamma, cfg.norm_scope)
        self.keep_v = False

    def __call__(self, model, optimizer, x, y, cfg, perturb_active=True, generator=None, x_adv=None):
        if model is not self.model or cfg != self.cfg:
            raise ValueError("model, cfg: a ReleasedTrainStep is bound to the model and config it was built with")
        if x_adv is None:
            model.train()
            x_adv = attack_pgd_released(model, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, generator)
        model.train()
        diff_scale, info = None, SearchInfo()
        if self.adversary is not None and perturb_active and cfg.gamma > 0:
            diff_scale = self.adversary.calc(x_adv, y)
            self.adversary.perturb(diff_scale)
            info.steps_taken = cfg.effective_k2
        robust_output = model(x_adv)
        robust_loss = F.cross_entropy(robust_output, y)
        optimizer.zero_grad()
        robust_loss.backward()
        optimizer.step()
        v = None
        if diff_scale is not None:
            self.adversary.restore(diff_scale)
            if self.keep_v:
                v = [(cfg.gamma * d).detach() for d in diff_scale.values()]
        return StepResult(robust_loss.item(), robust_output.detach(), x_adv, v, info)
