"""The fast training step: the reference step's semantics, built for throughput.

``FastTrainStep`` is a drop-in for ``rwp_fast.reference.train_step_ref`` (same call signature, same
StepResult fields) and computes the same thing — the equivalence tests hold it to the reference
step by step — with:

* bf16 autocast (or fp16 with a GradScaler) and channels-last weights on CUDA;
* ``torch.compile`` of the model (``cfg.compile_mode``);
* the fused ops: ``pgd_step`` in the attack, ``lsc_loss`` for every loss, ``weight_perturb`` over the
  flat weight buffer for the RWP/AWP search (``rwp_fast.perturb``);
* input-only gradients in the attack (weights frozen);
* no host synchronisation except the early-break check once per RWP iteration: losses and LSC
  diagnostics stay on the device until the end of the epoch.

The attacks and losses dispatch through ``rwp_fast.ops`` (backend from ``cfg.backend``).
"""

import contextlib

import torch

from ..attacks.pgd import pgd_attack, trades_attack
from ..config import FULL_RANGE
from ..ops import lsc_loss, lsc_loss_trades
from ..perturb.flat import FlatWeights
from ..perturb.search import FastSearchInfo, WeightPerturbation
from ..reference.train_step import StepResult

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_fast_settings(cfg, device):
    """(precision, compile, channels_last) with 'auto'/None resolved for `device`.

    On CUDA: bf16, compiled, channels-last. On CPU: fp32, eager, contiguous — the CPU path exists for
    correctness (CI) and the demo, and inductor on CPU would add minutes of compilation for nothing.
    """
    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    compile_model = cfg.compile if cfg.compile is not None else cuda
    channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
    return precision, compile_model, channels_last


class FastTrainStep:
    """Callable(model, optimizer, x, y, cfg, perturb_active, generator, x_adv) -> StepResult."""

    def __init__(self, model, optimizer, cfg, device):
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision, compile_model, channels_last = resolve_fast_settings(cfg, self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # before FlatWeights: the views keep these strides
        self.model = model
        self.params = list(model.parameters())
        self.flat = FlatWeights(model)
        self.forward = torch.compile(model, mode=cfg.compile_mode) if compile_model else model
        self.backend = None if cfg.backend == "auto" else cfg.backend
        self.perturbation = WeightPerturbation(self.flat, list(model.buffers()), cfg.gamma, cfg.perturb_steps,
                                               cfg.lsc_range, cfg.rwp_update, cfg.norm_scope, self.backend)
        amp_dtype = AMP_DTYPES.get(self.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.input_only = cfg.input_only_grads
        self.keep_v = False  # tests: return v (one tensor per weight) in StepResult.v; costs a copy

    # ---------------------------------------------------------------------------------------- pieces
    def _zero_grad(self):
        """Zero every gradient without breaking the flat-buffer views of the perturbed weights."""
        self.flat.zero_grad()
        flat_ids = {id(p) for p in self.flat.params}
        for p in self.params:
            if id(p) not in flat_ids:
                p.grad = None

    def adversarial_examples(self, x, y, generator):
        cfg, model = self.cfg, self.model
        if cfg.method == "at":
            model.train()
            return pgd_attack(self.forward, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm, True, "ce",
                              generator, self.params, self.autocast, self.input_only, self.backend)
        model.eval()
        x_adv = trades_attack(self.forward, x, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm, generator,
                              self.params, self.autocast, self.input_only, self.backend)
        model.train()
        return x_adv

    def losses(self, x, x_adv, y, lsc_range):
        """(masked_mean, loss, mask, count, logits_adv) at the current weights, train mode."""
        cfg = self.cfg
        p, q = lsc_range
        with self.autocast():
            if cfg.method == "at":
                logits_adv = self.forward(x_adv)
                out = lsc_loss(logits_adv, y, p, q, backend=self.backend)
            else:
                logits_nat, logits_adv = self.forward(x), self.forward(x_adv)
                out = lsc_loss_trades(logits_nat, logits_adv, y, cfg.trades_beta, p, q, backend=self.backend)
        return (*out, logits_adv)

    def _backward(self, loss):
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    # ------------------------------------------------------------------------------------------ step
    def __call__(self, model, optimizer, x, y, cfg, perturb_active=True, generator=None, x_adv=None):
        if model is not self.model or cfg != self.cfg:
            raise ValueError("model, cfg: a FastTrainStep is bound to the model and config it was built with")
        if x_adv is None:
            x_adv = self.adversarial_examples(x, y, generator)
        self.model.train()
        info = FastSearchInfo()
        if cfg.perturb != "none" and perturb_active and cfg.gamma > 0:
            # fp16: the probe loss is scaled against underflow and the flat gradient unscaled after it
            grad_scale = self.scaler.get_scale() if self.scaler is not None else None
            info = self.perturbation.search(lambda: self.losses(x, x_adv, y, cfg.lsc_range)[:4], y.shape[0],
                                            grad_scale)

        self._zero_grad()
        masked_mean, _, _, _, logits_adv = self.losses(x, x_adv, y, FULL_RANGE)
        self._backward(masked_mean)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        v = self.perturbation.v_tensors() if self.keep_v else None
        self.perturbation.remove()
        return StepResult(masked_mean.detach(), logits_adv.detach(), x_adv, v, info)
