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

from ..eval.epoch import evaluate_natural_and_pgd
from ..models import build_model
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
class EMATracker:
    """The weight average of one run, owned by the Trainer: the average itself (``ema``, None without
    ``ema_decay``), its evaluation model, and its best robust accuracy for best_ema.pt."""

    def __init__(self, cfg, model):
        """After the step function has set the weights' layout (flat buffer, channels-last)."""
        self.cfg = cfg
        self.ema = WeightEMA(model, cfg.ema_decay, cfg.ema_warmup_steps) if cfg.ema_decay > 0 else None
        self.eval_model = None  # built at the first evaluation
        self.best_metric, self.best_epoch = -1.0, -1
        self.improved = False

    def update(self, step):
        """After the step function returned: the weights are w again, never w + v."""
        if self.ema is not None:
            self.ema.update(step)

    def checkpoint_state(self, model):
        if self.ema is None:
            return {}
        return {"ema": {"model": self.ema.model_state(model)},
                "best_ema_metric": self.best_metric, "best_ema_epoch": self.best_epoch}

    def load_checkpoint_state(self, state, source):
        if self.ema is None:
            return
        if "ema" not in state:
            raise CheckpointError(f"{source}: holds no EMA weights, but this run has ema_decay {self.cfg.ema_decay}")
        self.ema.load_model_state(state["ema"]["model"], source)
        self.best_metric, self.best_epoch = state["best_ema_metric"], state["best_ema_epoch"]

    def epoch_metrics(self, model, data, eval_test, epoch, device, dist=None):
        """The EMA's test accuracy after `epoch` (the epochs completed), and its best so far: the metrics
        row's *_ema columns. The raw model's evaluation, images and seed included (sharded over `dist`'s
        processes), so the two sets of columns differ only by the weights. Empty without EMA."""
        if self.ema is None:
            return {}
        cfg = self.cfg
        if self.eval_model is None:
            self.eval_model = build_model(cfg.model, data.num_classes, data.in_channels, data.mean,
                                          data.std).to(device)
        self.eval_model.load_state_dict(self.ema.model_state(model))
        test = evaluate_natural_and_pgd(self.eval_model, *eval_test, cfg, cfg.eval_attack_steps,
                                        max(cfg.batch_size, 128), device, seed=cfg.seed, dist=dist)
        self.improved = test["robust_acc"] > self.best_metric
        if self.improved:
            self.best_metric, self.best_epoch = test["robust_acc"], epoch
        return {"test_natural_acc_ema": test["natural_acc"], "test_robust_acc_ema": test["robust_acc"],
                "test_robust_loss_ema": test["robust_loss"], "best_test_robust_acc_ema": self.best_metric,
                "best_epoch_ema": self.best_epoch}

    def save_best(self, out_dir, state):
        """best_ema.pt when the EMA's robust accuracy improved; written before last.pt, like best.pt."""
        if self.ema is not None and self.improved:
            save_checkpoint(os.path.join(out_dir, BEST_EMA_FILE), {**state, "selected_by": "ema"})


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
