"""The per-epoch evaluation of a training run: natural and PGD accuracy on a fixed image subset.

Used by the trainer (test PGD-20, which picks best.pt, and the train accuracy) and by the weight
average's own evaluation (rwp_fast.train.ema). The protocol (eval mode, the attack's random start, ε,
steps) is SPEC.md §4's; tests/test_eval_semantics.py pins it.
"""

import torch
import torch.nn.functional as F

from ..attacks import pgd_attack
from ..core import BatchSlice, accumulate_dtype, upcast


@torch.no_grad()
def _accuracy_and_loss(model, x, y):
    logits = upcast(model(x))  # fp32, or fp64 for an fp64 model (core.accumulate_dtype)
    return (logits.argmax(1) == y).sum().item(), F.cross_entropy(logits, y, reduction="sum").item()


def evaluate_natural_and_pgd(model, x_all, y_all, cfg, steps, batch_size, device, seed=0, dist=None):
    """Natural and PGD-`steps` accuracy/loss of `model` in eval mode on uint8 images (N, C, H, W).

    The attack start is drawn from a generator seeded with `seed`, so the evaluation is repeatable. It
    runs the fast attack (fused ``pgd_step``, weights frozen) in fp32 (fp64 for an fp64 model) on the eager
    model; with the torch backend that is exactly ``pgd_attack_ref``.

    dist: a DistContext of several processes: each evaluates its share of every batch, with its rows of
    the random start one process would draw (``BatchSlice``), and the sums are all-reduced once.
    """
    was_training = model.training
    model.eval()
    totals = dict(natural_correct=0, natural_loss=0.0, robust_correct=0, robust_loss=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = accumulate_dtype(next(model.parameters()).dtype)
    sharded = dist is not None and dist.enabled
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device).to(dtype) / 255
        y = y_all[i:i + batch_size].to(device)
        draws = gen
        if sharded:
            lo, hi = dist.rows(len(x))
            draws = BatchSlice(gen, slice(lo, hi), len(x))
            x, y = x[lo:hi], y[lo:hi]
            if hi == lo:  # only a short last batch can leave a process without rows; later draws unused
                continue
        c, loss = _accuracy_and_loss(model, x, y)
        totals["natural_correct"] += c
        totals["natural_loss"] += loss
        if steps > 0:
            x_adv = pgd_attack(model, x, y, cfg.eps, cfg.step_size, steps, cfg.norm, True, "ce", draws,
                               params=list(model.parameters()))
            c, loss = _accuracy_and_loss(model, x_adv, y)
            totals["robust_correct"] += c
            totals["robust_loss"] += loss
    model.train(was_training)
    if sharded:
        keys = list(totals)
        summed = dist.sum_(torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=device))
        totals = dict(zip(keys, summed.tolist()))
    n = max(len(x_all), 1)
    return {"natural_acc": totals["natural_correct"] / n, "natural_loss": totals["natural_loss"] / n,
            "robust_acc": totals["robust_correct"] / n, "robust_loss": totals["robust_loss"] / n}
