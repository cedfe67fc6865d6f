"""Reference for the fused op ``lsc_loss``: per-example loss with the Loss Stationary Condition mask.

SPEC.md §2. For per-example losses ℓᵢ the LSC mask over a range [p, q) is

    Vᵢ = 1  if  p ≤ ℓᵢ < q   (strict upper bound, as the released code's ``<``)

and the masked objective is (1/n) Σᵢ Vᵢ ℓᵢ: a mean over the whole batch n, NOT over the Vᵢ = 1
examples. RWP is [0, c_min), AWP is [0, ∞), plain AT has γ = 0 so the mask does not matter.

Two entries of the same op:
  * ``lsc_loss_ref``: ℓᵢ = CE(zᵢ, yᵢ), for AT and RST's labeled half.
  * ``lsc_loss_trades_ref``: ℓᵢ = CE(z_natᵢ, yᵢ) + β·Σ_c KL_c, for TRADES (and RST), with
    KL_c = p_nat,c (log p_nat,c − log p_adv,c): the per-class terms of KL(f(x) ‖ f(x_adv)) that the TRADES
    code sums with ``KLDivLoss(log_softmax(z_adv), softmax(z_nat))``. SPEC.md notes that the released
    TRADES-RWP code adds an (n,) tensor to an (n, C) one; the per-class sum is the evident intent.

All losses are computed in fp32, whatever the logits' dtype. Gradients flow through autograd.
"""

import math

import torch.nn.functional as F

from ..core import upcast


def lsc_mask_ref(per_example_loss, p=0.0, q=math.inf):
    """Bool mask (B,) of p ≤ ℓᵢ < q."""
    if not p <= q:
        raise ValueError(f"p, q: the LSC range [p, q) needs p <= q, got p={p}, q={q}")
    return (per_example_loss >= p) & (per_example_loss < q)


def _masked_mean(per_example_loss, p, q):
    mask = lsc_mask_ref(per_example_loss.detach(), p, q)
    n = per_example_loss.shape[0]
    masked_mean = (per_example_loss * mask.to(per_example_loss.dtype)).sum() / n
    return masked_mean, per_example_loss.detach(), mask, mask.sum()


def lsc_loss_ref(logits, target, p=0.0, q=math.inf):
    """Masked mean CE.

    logits: (B, C) float (fp32, fp16 or bf16); target: (B,) int64 class indices.
    Returns (masked_mean: () fp32 with grad, loss: (B,) fp32 detached, mask: (B,) bool,
    count: () int64 = Σ mask).
    """
    per_example = F.cross_entropy(upcast(logits), target, reduction="none")
    return _masked_mean(per_example, p, q)


def trades_per_example_ref(logits_nat, logits_adv, target, beta):
    """ℓᵢ = CE(z_natᵢ, yᵢ) + β·Σ_c p_nat,c (log p_nat,c − log p_adv,c), fp32, shape (B,)."""
    z_nat, z_adv = upcast(logits_nat), upcast(logits_adv)
    ce = F.cross_entropy(z_nat, target, reduction="none")
    log_p_nat = F.log_softmax(z_nat, dim=1)
    log_p_adv = F.log_softmax(z_adv, dim=1)
    kl = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(dim=1)
    return ce + beta * kl


def lsc_loss_trades_ref(logits_nat, logits_adv, target, beta, p=0.0, q=math.inf):
    """TRADES entry: same outputs as ``lsc_loss_ref`` with ℓᵢ = CE + β·Σ_c KL_c.

    With the full mask the masked mean is the TRADES batch loss CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)).
    """
    return _masked_mean(trades_per_example_ref(logits_nat, logits_adv, target, beta), p, q)
