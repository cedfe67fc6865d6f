"""Public op ``lsc_loss``: per-example loss, LSC mask p ≤ ℓᵢ < q and masked mean (SPEC.md §2).

Both entries return ``(masked_mean, loss, mask, count)`` as ``rwp_fast.reference.lsc_loss_ref`` does:
masked_mean () fp32 = (1/B)·Σ Vᵢℓᵢ, differentiable w.r.t. the logits; loss (B,) fp32 detached;
mask (B,) bool; count () int64 = Σ Vᵢ. The triton and cuda backends run through a
``torch.autograd.Function`` whose forward and backward are single kernels; the torch backend is the
reference itself, differentiated by autograd.
"""

import math

import torch

from ..reference.lsc_loss import lsc_loss_ref, lsc_loss_trades_ref
from . import dispatch

OP = "lsc_loss"


def _outputs(ctx, masked_mean, loss, mask, count):
    """The reference's output convention: () fp32 mean, (B,) fp32 loss, (B,) bool mask, () int64 count."""
    count = count.view(())
    ctx.mark_non_differentiable(loss, mask, count)
    return masked_mean.view(()), loss, mask, count


class _LSCLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, p, q, impl):
        loss, mask, count, masked_mean, lse = impl.lsc_loss_fwd(logits, target, p, q)
        ctx.save_for_backward(logits, target, lse, mask)
        ctx.impl = impl
        return _outputs(ctx, masked_mean, loss, mask, count)

    @staticmethod
    def backward(ctx, grad_masked_mean, *_):
        logits, target, lse, mask = ctx.saved_tensors
        grad_out = grad_masked_mean.float().contiguous()
        return ctx.impl.lsc_loss_bwd(grad_out, logits, target, lse, mask), None, None, None, None


class _LSCLossTrades(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_nat, logits_adv, target, beta, p, q, impl):
        loss, mask, count, masked_mean, lse_nat, lse_adv, kl = impl.lsc_loss_trades_fwd(
            logits_nat, logits_adv, target, beta, p, q)
        ctx.save_for_backward(logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask)
        ctx.impl, ctx.beta = impl, beta
        return _outputs(ctx, masked_mean, loss, mask, count)

    @staticmethod
    def backward(ctx, grad_masked_mean, *_):
        logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask = ctx.saved_tensors
        grad_out = grad_masked_mean.float().contiguous()
        d_nat, d_adv = ctx.impl.lsc_loss_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat,
                                                    lse_adv, kl, mask, ctx.beta)
        return d_nat, d_adv, None, None, None, None, None


def lsc_loss(logits, target, p=0.0, q=math.inf, backend=None):
    """Masked mean CE over the LSC range [p, q).

    logits: (B, C) fp32/fp16/bf16; target: (B,) int64. RWP uses [0, c_min), AWP [0, inf).
    Returns (masked_mean () fp32, loss (B,) fp32, mask (B,) bool, count () int64).
    """
    name = dispatch.choose_backend(OP, logits.device, backend)
    if name == "torch":
        return lsc_loss_ref(logits, target, p, q)
    # .contiguous(): the kernels index rows as row·C (a no-op for the usual contiguous logits).
    return _LSCLoss.apply(logits.contiguous(), target.contiguous(), float(p), float(q),
                          dispatch.backend_module(name, OP))


def lsc_loss_trades(logits_nat, logits_adv, target, beta, p=0.0, q=math.inf, backend=None):
    """TRADES entry: ℓᵢ = CE(z_natᵢ, yᵢ) + β·Σ_c p_nat,c (log p_nat,c − log p_adv,c), masked as lsc_loss.

    logits_nat, logits_adv: (B, C) same dtype; differentiable w.r.t. both.
    """
    name = dispatch.choose_backend(OP, logits_nat.device, backend)
    if name == "torch":
        return lsc_loss_trades_ref(logits_nat, logits_adv, target, beta, p, q)
    return _LSCLossTrades.apply(logits_nat.contiguous(), logits_adv.contiguous(), target.contiguous(), float(beta),
                                float(p), float(q), dispatch.backend_module(name, OP))
