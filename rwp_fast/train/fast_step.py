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

Training modes (``cfg.compile_mode``; the compile switch itself is ``cfg.compile``):

* ``default``, ``max-autotune``, ``max-autotune-no-cudagraphs``: ``torch.compile`` modes of the model,
  RWP early break with one host sync per probe (``WeightPerturbation`` 'sync' schedule);
* ``reduce-overhead``: ``torch.compile(mode='reduce-overhead')`` (Inductor's CUDA-graph trees) for every
  forward and backward: attack, probes, training step. Each call starts a new graph-tree step
  (``torch.compiler.cudagraph_mark_step_begin``), its outputs are consumed before the next call or
  copied (logits in the StepResult), and the early break is stall-free;
* ``cuda-graphs``: the whole attack and one probe captured explicitly (``rwp_fast.train.graphs``),
  stall-free early break, the training forward/backward/optimizer step as in ``default``.

A graph mode that raises during its first ``TRIAL_STEPS`` steps (capture or replay) restores the model
and optimizer state saved before the step, warns in one line and continues in ``default`` mode; so does
one that cannot apply at all (no CUDA device for ``cuda-graphs``, fp16 with its loss-scale syncs).
"""

import contextlib
import warnings

import torch

from ..attacks.pgd import pgd_attack, trades_attack
from ..config import FULL_RANGE
from ..ops import lsc_loss, lsc_loss_trades
from ..perturb.flat import FlatWeights
from ..perturb.search import FastSearchInfo, WeightPerturbation
from ..core import StepResult

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAPH_MODES = ("reduce-overhead", "cuda-graphs")
# Steps run under the fallback guard: graph trees warm up on the 1st call and record on the 2nd, and the
# explicit capture happens on the 1st; a 3rd replays. Each guarded step clones model + optimizer state.
TRIAL_STEPS = 3


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


def _no_mark():
    pass


class FastTrainStep:
    """Callable(model, optimizer, x, y, cfg, perturb_active, generator, x_adv) -> StepResult.

    capture: cuda-graphs mode only; None captures on CUDA. False runs the static-buffer bodies eagerly
    (CPU tests of exactly the code the graphs capture).
    """

    def __init__(self, model, optimizer, cfg, device, capture=None, dist=None):
        self.cfg = cfg
        # many processes (rwp_fast.train.distributed): x, y are this process's rows of the global batch
        self.dist = dist if dist is not None and dist.enabled else None
        self.device = torch.device(device)
        self.precision, self.compile_model, channels_last = resolve_fast_settings(cfg, self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # before FlatWeights: the views keep these strides
        self.model = model
        self.optimizer = optimizer
        self.params = list(model.parameters())
        self.flat = FlatWeights(model)
        flat_ids = {id(p) for p in self.flat.params}
        self.backend = None if cfg.backend == "auto" else cfg.backend
        self.perturbation = WeightPerturbation(self.flat, list(model.buffers()), cfg.gamma, cfg.effective_k2,
                                               cfg.lsc_range, cfg.rwp_update, cfg.norm_scope, self.backend,
                                               other_params=[p for p in self.params if id(p) not in flat_ids],
                                               comm=self.dist)
        self.other_params = [p for p in self.params if id(p) not in flat_ids]
        amp_dtype = AMP_DTYPES.get(self.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.input_only = cfg.input_only_grads
        self.keep_v = False  # tests: return v (one tensor per weight) in StepResult.v; costs a copy
        self.capture = capture
        self.static = None  # cuda-graphs: StaticStep, built at the first step (it needs the batch shape)
        self.trials_left = TRIAL_STEPS
        self.mode = cfg.compile_mode
        reason = self._unsupported_reason()
        if reason:
            self._warn_fallback(reason)
        self._set_mode(self.mode if not reason else "default")

    # ------------------------------------------------------------------------------------ modes
    def _unsupported_reason(self):
        if self.mode not in GRAPH_MODES:
            return None
        if self.dist is not None:
            return "capturing the all-reduces of a multi-process run is not supported (unmeasured)"
        if self.precision == "fp16":
            return "fp16 needs host syncs for its loss scale"
        if self.mode == "cuda-graphs" and self.capture is not False and self.device.type != "cuda":
            return f"device {self.device} has no CUDA graphs"
        return None

    def _warn_fallback(self, reason):
        warnings.warn(f"compile_mode={self.cfg.compile_mode!r}: {reason}; falling back to the default "
                      "compiled path", RuntimeWarning, stacklevel=3)

    def _set_mode(self, mode):
        self.mode = mode
        torch_mode = {"cuda-graphs": "default"}.get(mode, mode)
        self.forward = torch.compile(self.model, mode=torch_mode) if self.compile_model else self.model
        # reduce-overhead: every forward starts a new CUDA-graph-tree step, so the previous step's outputs
        # may be overwritten; the code below consumes each output before the next forward.
        compiled_trees = mode == "reduce-overhead" and self.compile_model
        self._mark_step = torch.compiler.cudagraph_mark_step_begin if compiled_trees else _no_mark
        self.break_schedule = "stall-free" if mode in GRAPH_MODES else "sync"
        self.static = None

    def _attack_forward(self, inp):
        self._mark_step()
        return self.forward(inp)

    def state_tensors(self):
        """Tensors a failed graph capture must restore: flat weights, BN buffers, search state."""
        return [self.flat.w, *self.model.buffers(), *self.perturbation.persistent_tensors().values()]

    def persistent_tensors(self):
        """{name: tensor} of every buffer whose address CUDA graphs rely on (the capture-safety tests)."""
        out = {"flat.w": self.flat.w, "flat.g": self.flat.g}
        out.update({f"perturb.{k}": t for k, t in self.perturbation.persistent_tensors().items()})
        for i, p in enumerate(self.params):
            for k, t in self.optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor):
                    out[f"optim.{i}.{k}"] = t
        if self.static is not None:
            out.update(self.static.persistent_tensors())
        return out

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
            return pgd_attack(self._attack_forward, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm,
                              True, "ce", generator, self.params, self.autocast, self.input_only, self.backend)
        model.eval()
        x_adv = trades_attack(self._attack_forward, x, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm,
                              generator, self.params, self.autocast, self.input_only, self.backend)
        model.train()
        return x_adv

    def losses(self, x, x_adv, y, lsc_range):
        """(masked_mean, loss, mask, count, logits_adv) at the current weights, train mode."""
        cfg = self.cfg
        p, q = lsc_range
        self._mark_step()
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
        if model is not self.model or cfg != self.cfg or optimizer is not self.optimizer:
            raise ValueError("model, optimizer, cfg: a FastTrainStep is bound to the model, optimizer and config "
                             "it was built with")
        # The search reads the probe gradients from flat.g: a .grad set to None (zero_grad's default) or
        # replaced since the last step would leave v = 0, RWP silently becoming AT.
        self.flat.attach_grads()
        if self.mode not in GRAPH_MODES or self.trials_left <= 0:
            return self._step(x, y, perturb_active, generator, x_adv)
        saved = _TrainingState(self, generator)
        try:
            result = self._step(x, y, perturb_active, generator, x_adv)
        except Exception as exc:  # noqa: BLE001 - any capture/replay failure; KeyboardInterrupt passes
            saved.restore()
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            self._warn_fallback(f"failed ({type(exc).__name__}: {detail})")
            self._set_mode("default")
            return self._step(x, y, perturb_active, generator, x_adv)
        self.trials_left -= 1
        return result

    def _step(self, x, y, perturb_active, generator, x_adv):
        if x_adv is None and self.mode == "cuda-graphs":
            if self.static is None or not self.static.matches(x, y):
                from .graphs import StaticStep
                self.static = StaticStep(self, x, y, self.capture is not False)
            return self.static(x, y, perturb_active, generator)
        if x_adv is None:
            x_adv = self.adversarial_examples(x, y, generator)
        return self.step_after_attack(x, y, x_adv, perturb_active)

    def step_after_attack(self, x, y, x_adv, perturb_active, run_probe=None):
        """The weight-perturbation search and the SGD step at w + v (steps 2–3 of the reference step).

        run_probe: the stall-free schedule's probe launcher (a CUDA graph's replay); None: eager probes.
        """
        cfg = self.cfg
        self.model.train()
        info = FastSearchInfo()
        if cfg.perturb != "none" and perturb_active and cfg.gamma > 0:
            # fp16: the probe loss is scaled against underflow and the flat gradient unscaled after it
            grad_scale = self.scaler.get_scale() if self.scaler is not None else None
            # One probe (AWP): the stall-free schedule reads no count at all, and is exact (gated update)
            schedule = "stall-free" if cfg.effective_k2 == 1 and grad_scale is None else self.break_schedule
            global_batch = y.shape[0] * (self.dist.world_size if self.dist is not None else 1)
            info = self.perturbation.search(lambda: self.losses(x, x_adv, y, cfg.lsc_range)[:4], global_batch,
                                            grad_scale, schedule=schedule, run_probe=run_probe)

        self._zero_grad()
        masked_mean, _, _, _, logits_adv = self.losses(x, x_adv, y, FULL_RANGE)
        self._backward(masked_mean)
        if self.dist is not None:
            # Two all-reduces: the flat weight gradient and the rest (biases, norm affine) concatenated.
            # The mean of the per-process means of B/N rows is the global batch mean (equal shares).
            self.dist.average_(self.flat.g)
            self.dist.average_grads_(self.other_params)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        v = self.perturbation.v_tensors() if self.keep_v else None
        self.perturbation.remove()
        logits_adv = logits_adv.detach()
        if self.mode == "reduce-overhead":  # a graph-tree output: the next step's forward overwrites it
            logits_adv = logits_adv.clone()
        return StepResult(masked_mean.detach(), logits_adv, x_adv, v, info)


class _TrainingState:
    """Copies of what one training step changes (weights, buffers, optimizer state, the generator), so a
    graph mode that fails mid-step can be rolled back and the step rerun in default mode."""

    def __init__(self, step, generator):
        self.step = step
        self.tensors = [(t, t.detach().clone()) for t in (*step.model.parameters(), *step.model.buffers())]
        self.optim_state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                            for p, st in step.optimizer.state.items()}
        self.generator = generator
        self.gen_state = generator.get_state() if generator is not None else None

    def restore(self):
        step = self.step
        step.perturbation.active = False
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
        for p in list(step.optimizer.state):
            if p not in self.optim_state:
                del step.optimizer.state[p]
        for p, st in self.optim_state.items():
            for k, v in st.items():
                cur = step.optimizer.state[p].get(k)
                if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor) and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    step.optimizer.state[p][k] = v
        if self.generator is not None:
            self.generator.set_state(self.gen_state)
