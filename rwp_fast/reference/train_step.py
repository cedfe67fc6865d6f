"""Reference training step for AT, TRADES and RST, each with none / AWP / RWP (SPEC.md §2–§3).

    1. inner maximisation: x_adv by PGD (AT, train mode) or the TRADES KL attack (TRADES/RST, eval mode);
    2. outer maximisation: v by the weight-perturbation search (skipped for 'none' and during warm-up);
    3. w ← w + v;  loss = mean ℓ(f_w(x_adv));  backward;  optimizer.step();  w ← w − v.

So momentum and weight decay act at w + v, and v is removed afterwards. The final forward at w + v
updates the BatchNorm running statistics, as in the released code. RST is the TRADES step applied to a
batch whose second half is pseudo-labeled extra data; the data pipeline does the mixing.
"""


import torch
import torch.nn.functional as F

from ..core import SearchInfo, StepResult, perturbed_parameters, upcast
from .attacks import pgd_attack_ref, trades_attack_ref
from .lsc_loss import trades_per_example_ref
from .perturbation_search import add_perturbation, weight_perturbation_search_ref


def per_example_loss_fn(cfg, x, x_adv, y):
    """The per-example training loss ℓᵢ as a function of the model, for the search and the update."""
    if cfg.method == "at":
        return lambda model: F.cross_entropy(upcast(model(x_adv)), y, reduction="none")
    beta = cfg.trades_beta
    return lambda model: trades_per_example_ref(model(x), model(x_adv), y, beta)


def adversarial_examples_ref(model, x, y, cfg, generator=None):
    """Step 1: AT attacks in train mode (batch statistics); TRADES and RST in eval mode."""
    was_training = model.training
    if cfg.method == "at":
        model.train()
        x_adv = pgd_attack_ref(model, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm,
                               random_start=True, generator=generator)
    else:
        model.eval()
        x_adv = trades_attack_ref(model, x, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm,
                                  generator=generator)
    model.train(was_training)
    return x_adv


def train_step_ref(model, optimizer, x, y, cfg, perturb_active=True, generator=None, x_adv=None):
    """One full training step; mutates model and optimizer. Returns StepResult.

    x: (B, C, H, W) in [0, 1]; y: (B,) int64. perturb_active=False during the warm-up epochs.
    x_adv: pass a precomputed adversarial batch to skip step 1 (tests compare steps 2–3 alone).
    """
    if x_adv is None:
        x_adv = adversarial_examples_ref(model, x, y, cfg, generator)
    model.train()
    loss_of = per_example_loss_fn(cfg, x, x_adv, y)
    params = [p for _, p in perturbed_parameters(model)]
    if cfg.perturb != "none" and perturb_active and cfg.gamma > 0:
        v, info = weight_perturbation_search_ref(model, loss_of, cfg.gamma, cfg.effective_k2,
                                                 cfg.lsc_range, cfg.rwp_update, cfg.norm_scope)
    else:
        v, info = [torch.zeros_like(p) for p in params], SearchInfo()

    add_perturbation(params, v, +1)
    optimizer.zero_grad(set_to_none=True)
    if cfg.method == "at":
        logits_adv = model(x_adv)
        loss = F.cross_entropy(upcast(logits_adv), y)
    else:
        logits_nat, logits_adv = model(x), model(x_adv)
        loss = trades_per_example_ref(logits_nat, logits_adv, y, cfg.trades_beta).mean()
    loss.backward()
    optimizer.step()
    add_perturbation(params, v, -1)
    return StepResult(loss.item(), logits_adv.detach(), x_adv, v, info)
