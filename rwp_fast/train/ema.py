"""Exponential moving average (EMA) of the weights, evaluated and checkpointed beside the raw model.

``--ema-decay D`` (0 = off, the default: the paper's presets are unchanged) keeps
avg ← D·avg + (1 − D)·w after every optimizer step; ``--ema-warmup-steps W``: the first W steps copy
the weights instead (avg = w), so the average does not start from the random initialisation (with
D = 0.999, the initial weights would still weigh 0.999^2000 ≈ 14% after 2,000 steps).

* Over the unperturbed weights w, never w + v: the update runs in the trainer after the step function
  has returned, and both step functions (reference and fast) remove v before they return
  (tests/test_ema.py holds the average to the weights seen after each step, with a large γ).
* BatchNorm: the running mean and variance are averaged with the same decay, like the weights
  (timm's ModelEmaV2 does the same). Recomputing them instead would cost a pass over training data per
  evaluation, and under adversarial training it is not even clear on which inputs (the raw model's
  statistics are those of adversarial examples, at w + v under AWP/RWP). Averaging keeps statistics
  and weights on one time scale: D = 0.999 averages over ~1,000 steps, the BN momentum 0.1 over ~10.
  Integer buffers (num_batches_tracked: unused when BN has a momentum) are copied from the raw model.
* One multi-tensor op per step (``torch._foreach_lerp_``, or ``_foreach_copy_`` during warm-up) over
  every floating parameter and buffer; the decay is a Python float and the step count a host int, so
  nothing is read back from the device (no host sync).
* Evaluated every epoch with the same PGD and seed as the raw model: ``test_robust_acc_ema`` and
  ``test_natural_acc_ema`` in metrics.jsonl; ``best_ema.pt`` is chosen by the EMA's own robust accuracy
  (and marked ``selected_by: ema``, so ``rwp-fast eval`` evaluates its EMA weights by default).
* In checkpoints as ``ema: {model: state dict}`` plus ``best_ema_metric``/``best_ema_epoch``; resumed
  exactly.
"""

import os

import torch

from .checkpoint import CheckpointError, save_checkpoint

BEST_EMA_FILE = "best_ema.pt"
WEIGHTS = ("ema", "raw")


def _foreach_lerp_(avg, live, weight):
    if hasattr(torch, "_foreach_lerp_"):
        torch._foreach_lerp_(avg, live, weight)
    else:  # pragma: no cover - torch without _foreach_lerp_
        for a, w in zip(avg, live):
            a.lerp_(w, weight)


def _foreach_copy_(dst, src):
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover
        for d, s in zip(dst, src):
            d.copy_(s)


class WeightEMA:
    """The average of every floating parameter and buffer of `model` (same dtype, device and strides, so
    the foreach op takes its multi-tensor fast path)."""

    def __init__(self, model, decay, warmup_steps=0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {decay!r}")
        self.decay, self.warmup_steps = float(decay), int(warmup_steps)
        named = [*model.named_parameters(), *model.named_buffers()]
        self.names = [n for n, t in named if t.is_floating_point()]
        self.live = [t for _, t in named if t.is_floating_point()]
        with torch.no_grad():
            self.avg = [t.detach().clone() for t in self.live]   # clone keeps the strides (channels-last)

    @torch.no_grad()
    def update(self, step):
        """After optimizer step number `step` (1-based): avg ← lerp(avg, w, 1 − decay), one foreach op."""
        if step <= self.warmup_steps:
            _foreach_copy_(self.avg, self.live)
        else:
            _foreach_lerp_(self.avg, self.live, 1.0 - self.decay)

    def model_state(self, model):
        """`model`'s state dict with the averaged tensors in place of the floating ones (a copy)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, a in zip(self.names, self.avg):
            state[name] = a.detach().clone()
        return state

    def load_model_state(self, state, source):
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"{source}: its EMA weights lack {len(missing)} tensors (e.g. {missing[0]})")
        with torch.no_grad():
            for name, a in zip(self.names, self.avg):
                if state[name].shape != a.shape:
                    raise CheckpointError(f"{source}: EMA tensor {name} has shape {tuple(state[name].shape)}, "
                                          f"the model {tuple(a.shape)}")
                a.copy_(state[name])


# ------------------------------------------------------------------------------- trainer hooks
def attach(trainer):
    """Called at the end of Trainer.__init__ (after the step function has set the weights' layout)."""
    cfg = trainer.cfg
    trainer.ema = WeightEMA(trainer.model, cfg.ema_decay, cfg.ema_warmup_steps) if cfg.ema_decay > 0 else None
    trainer.ema_model = None
    trainer.best_ema_metric, trainer.best_ema_epoch = -1.0, -1
    trainer.ema_improved = False


def checkpoint_state(trainer):
    if trainer.ema is None:
        return {}
    return {"ema": {"model": trainer.ema.model_state(trainer.model)},
            "best_ema_metric": trainer.best_ema_metric, "best_ema_epoch": trainer.best_ema_epoch}


def load_checkpoint_state(trainer, state, source):
    if trainer.ema is None:
        return
    if "ema" not in state:
        raise CheckpointError(f"{source}: holds no EMA weights, but this run has ema_decay "
                              f"{trainer.cfg.ema_decay}")
    trainer.ema.load_model_state(state["ema"]["model"], source)
    trainer.best_ema_metric, trainer.best_ema_epoch = state["best_ema_metric"], state["best_ema_epoch"]


def epoch_metrics(trainer):
    """The EMA's test accuracy after the epoch just completed (trainer.epoch), and its best so far: the
    metrics row's *_ema columns. Empty without EMA."""
    if trainer.ema is None:
        return {}
    from ..models import build_model
    from .trainer import evaluate_natural_and_pgd
    cfg, d = trainer.cfg, trainer.data
    if trainer.ema_model is None:
        trainer.ema_model = build_model(cfg.model, d.num_classes, d.in_channels, d.mean, d.std).to(trainer.device)
    trainer.ema_model.load_state_dict(trainer.ema.model_state(trainer.model))
    # the raw model's evaluation, images and seed included: the two columns differ only by the weights
    test = evaluate_natural_and_pgd(trainer.ema_model, *trainer.eval_test, cfg, cfg.eval_attack_steps,
                                    max(cfg.batch_size, 128), trainer.device, seed=cfg.seed,
                                    dist=getattr(trainer, "dist", None))  # sharded in a multi-process run
    trainer.ema_improved = test["robust_acc"] > trainer.best_ema_metric
    if trainer.ema_improved:
        trainer.best_ema_metric, trainer.best_ema_epoch = test["robust_acc"], trainer.epoch
    return {"test_natural_acc_ema": test["natural_acc"], "test_robust_acc_ema": test["robust_acc"],
            "test_robust_loss_ema": test["robust_loss"], "best_test_robust_acc_ema": trainer.best_ema_metric,
            "best_epoch_ema": trainer.best_ema_epoch}


def save_best(trainer, state):
    """best_ema.pt when the EMA's robust accuracy improved; written before last.pt, like best.pt."""
    if trainer.ema is not None and trainer.ema_improved:
        save_checkpoint(os.path.join(trainer.out_dir, BEST_EMA_FILE), {**state, "selected_by": "ema"})


def select_weights(state, weights, path):
    """The model state dict that `rwp-fast eval --weights` asks for; None means the default: the EMA
    weights of a checkpoint chosen by them (best_ema.pt), the raw weights otherwise."""
    if weights is None:
        weights = "ema" if state.get("selected_by") == "ema" else "raw"
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "raw":
        return state["model"], weights
    if "ema" not in state:
        raise CheckpointError(f"weights: checkpoint {path} holds no EMA weights (trained with ema_decay 0); "
                              "allowed here: raw")
    return state["ema"]["model"], weights
