"""The fast training step: the reference step (``rwp_fast.reference.train_step_ref``) as four phases.

Same call, same results: the tests hold it to the reference in float64, step by step. The phases read
and write persistent buffers only (the batch, x_adv, the noise, the flat weights and gradients, the
search state, the momentum buffers), so each is a function that ``torch.compile(fullgraph=True)``
traces and a CUDA graph can hold:

1. attack: the random start and K1 ``ascend_`` steps, then ``WeightPerturbation.begin``;
2. probe forward: loss at w + v, LSC mask, count (K2 times at most);
3. probe backward: the masked mean's gradient into the flat buffer, and the update of v;
4. train: BN restored, forward at w + v, backward, the SGD update, ‖v‖/‖w‖, v removed.

Between 2 and 3 the host reads the count: the exact early break, one sync per probe (SPEC.md §2).

Modes, chosen once at start-up (``self.mode``): ``eager`` (CPU default), ``compiled`` (each phase body
compiled with fullgraph) and ``captured`` (``rwp_fast.train.graphs``: the phases as CUDA graphs sharing
one memory pool, the CUDA default). A phase that does not compile with fullgraph warns once with the whole
cause and runs on with graph breaks allowed (``phase_compile``); a capture that raises warns once and leaves
the step compiled. ``mode_counts`` counts the steps by the mode each really ran in (``step_mode``), for
metrics.jsonl, bench rows and verify.
"""

import collections
import contextlib
import warnings

import torch

from ..attacks.pgd import ascend_, frozen, input_leaf, objective
from ..config import FULL_RANGE
from ..core import TRADES_INIT_STD, SearchInfo, StepResult, draw, draw_random_init_noise, trades_kl_sum, upcast
from ..ops import OpSet
from ..perturb.flat import FlatWeights
from ..perturb.search import WeightPerturbation
from .graphs import run_captured
from .phase_compile import PhaseFunction
from .sgd import SGDUpdate

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_fast_settings(cfg, device):
    """(precision, compile, channels_last) with 'auto'/None resolved for `device`.

    On CUDA: bf16, compiled, channels-last. On CPU: fp32, eager, contiguous: the CPU path exists for
    correctness (CI) and the demo, and Inductor's C++ compile would cost minutes (``--compile`` asks for it).
    """
    cuda = device.type == "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    compile_model = cfg.compile if cfg.compile is not None else cuda
    channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
    return precision, compile_model, channels_last


def capture_refusal(cfg, device, precision, dist):
    """Why the phases cannot be captured here (a sentence), or None. Decided once, at start-up."""
    if device.type != "cuda":
        return f"device {device} has no CUDA graphs"
    if dist is not None:
        return "capturing the all-reduces of a multi-process run is not supported"
    if precision == "fp16":
        return "fp16 reads its loss scale on the host"
    return None


def _autograd_tracing():
    """Dynamo traces torch.autograd.grad in the attack step only with this config (off by default on 2.11 to
    2.14, the range setup.py accepts)."""
    return torch._dynamo.config.patch(trace_autograd_ops=True)


class FastTrainStep:
    """Callable(model, optimizer, x, y, cfg, perturb_active, generator, x_adv) -> StepResult.

    capture: None captures where ``capture_refusal`` allows (compile_mode 'auto' or 'cuda-graphs');
    False never does.
    """

    def __init__(self, model, optimizer, cfg, device, capture=None, dist=None):
        self.cfg, self.device = cfg, torch.device(device)
        self.dist = dist if dist is not None and dist.enabled else None
        self.precision, compile_phases, channels_last = resolve_fast_settings(cfg, self.device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)  # before FlatWeights: the views keep these strides
        if self.device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): one search per conv shape
        self.model, self.optimizer = model, optimizer
        self.ops = OpSet(self.device, None if cfg.backend == "auto" else cfg.backend)
        self.flat = FlatWeights(model)
        self.params = list(model.parameters())
        self.sgd = SGDUpdate(optimizer, self.params)
        self.perturbation = None
        if cfg.perturb != "none" and cfg.gamma > 0 and cfg.effective_k2 > 0:
            self.perturbation = WeightPerturbation(self.flat, list(model.buffers()), cfg.gamma, cfg.effective_k2,
                                                   cfg.lsc_range, cfg.rwp_update, cfg.norm_scope, self.ops,
                                                   comm=self.dist)
        amp_dtype = AMP_DTYPES.get(self.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.keep_v = False  # tests: return v (one tensor per weight) in StepResult.v; costs a copy
        self.buffers = None  # x, y, x_adv, noise, radius: shaped by the first batch
        self.graphs = None   # rwp_fast.train.graphs.PhaseGraphs once the warm-up is done
        self.phase_runs = collections.Counter()  # attack, probe (forward + backward), train: the warm-up
        self.grad_scale = None  # fp16: the loss scale, read once per step
        wants_capture = cfg.compile_mode in ("auto", "cuda-graphs") and capture is not False
        refusal = capture_refusal(cfg, self.device, self.precision, self.dist) if wants_capture else None
        if refusal and cfg.compile_mode == "cuda-graphs":
            self.warn(f"{refusal}; running the compiled phases")
        # captured phases are compiled ones unless compile is off, whose eager bodies are captured as they are
        self.mode = "captured" if wants_capture and not refusal else ("compiled" if compile_phases else "eager")
        mode = "default" if cfg.compile_mode in ("auto", "cuda-graphs") else cfg.compile_mode
        # fullgraph: a graph break falls back loudly (phase_compile), it is not a silent slow path. Many
        # processes: SyncBatchNorm's collectives inside a phase are untested, so there graphs may break.
        self.phases = {name: PhaseFunction(getattr(self, name), name, compile_phases, mode, self.dist is None,
                                           self.warn)
                       for name in ("attack_start", "attack_step", "search_begin", "probe_forward", "update",
                                    "train_forward", "train_update")}
        self.run_attack_start, self.run_search_begin = self.phases["attack_start"], self.phases["search_begin"]
        self.run_attack_step = self.phases["attack_step"]
        self.run_probe_forward, self.run_update = self.phases["probe_forward"], self.phases["update"]
        self.run_train_forward, self.run_train_update = self.phases["train_forward"], self.phases["train_update"]
        self.mode_counts = collections.Counter()  # {mode a step ran in: steps}: step_mode() per step

    @property
    def fallbacks(self):
        """One line per phase that left fullgraph (phase_compile.PhaseFunction.fallback)."""
        return [p.fallback for p in self.phases.values() if p.fallback]

    def step_mode(self, captured=None):
        """The mode one step ran in: `captured` when it replayed graphs ('captured', or 'captured-partial'
        when a unit ran uncaptured), else 'compiled', 'compiled-graph-breaks' (a phase fell back from
        fullgraph) or 'eager'."""
        if captured:
            return captured
        if all(p.level == "eager" for p in self.phases.values()):
            return "eager"
        return "compiled-graph-breaks" if self.fallbacks else "compiled"

    def warn(self, message, category=RuntimeWarning):
        warnings.warn(f"compile_mode={self.cfg.compile_mode!r}: {message}", category, stacklevel=3)

    # -------------------------------------------------------------- phase bodies (device code only)
    def losses(self, x, x_adv, y, lsc_range):
        """(masked_mean, loss, mask, count, logits_adv) at the current weights, train mode."""
        p, q = lsc_range
        with self.autocast():
            if self.cfg.method == "at":
                logits_adv = self.model(x_adv)
                out = self.ops.lsc_loss(logits_adv, y, p, q)
            else:
                logits_nat, logits_adv = self.model(x), self.model(x_adv)
                out = self.ops.lsc_loss_trades(logits_nat, logits_adv, y, self.cfg.trades_beta, p, q)
        return (*out, logits_adv)

    def attack_start(self):
        b, cfg = self.buffers, self.cfg
        if cfg.method == "at":
            b["x_adv"].copy_(self.ops.pgd_random_init(b["x"], b["noise"], cfg.eps, cfg.norm, b["radius"]))
            return None
        with torch.no_grad(), self.autocast():
            p_nat = torch.softmax(upcast(self.model(b["x"])), dim=1)  # TRADES' target, fixed for the attack
        b["x_adv"].copy_((b["x"] + TRADES_INIT_STD * b["noise"]).to(b["x"].dtype))
        return p_nat

    def attack_step(self, p_nat):
        b, cfg = self.buffers, self.cfg
        if cfg.method == "at":
            goal = lambda logits: objective(logits, b["y"], "ce")  # noqa: E731
        else:
            goal = lambda logits: trades_kl_sum(logits, p_nat)  # noqa: E731
        ascend_(self.model, b["x_adv"], b["leaf"], b["x"], goal, cfg.step_size, cfg.eps, cfg.norm, self.autocast,
                self.ops.pgd_step_)

    def search_begin(self):
        self.perturbation.begin()

    def probe_forward(self):
        b = self.buffers
        self.flat.g.zero_()
        masked_mean, _, _, count, _ = self.losses(b["x"], b["x_adv"], b["y"], self.cfg.lsc_range)
        self.perturbation.record_count(count)
        return masked_mean

    def update(self):
        self.perturbation.update_from_grad()

    def train_forward(self):
        b = self.buffers
        if self.perturbation is not None:
            self.perturbation.restore_buffers()  # the probes ran in train mode
        self.flat.zero_grad()
        masked_mean, _, _, _, logits_adv = self.losses(b["x"], b["x_adv"], b["y"], FULL_RANGE)
        return masked_mean.detach(), logits_adv.detach(), masked_mean

    def train_update(self):
        self.sgd.update()
        if self.perturbation is not None:
            self.perturbation.finish()

    # --------------------------------------------------------------------- phases (host around them)
    def attack(self):
        self.phase_runs["attack"] += 1
        model = self.model
        model.train(self.cfg.method == "at")  # AT attacks in train mode, TRADES in eval (SPEC.md §1)
        p_nat = self.run_attack_start()
        with frozen(self.params) if self.cfg.input_only_grads else contextlib.nullcontext(), _autograd_tracing():
            for _ in range(self.cfg.attack_steps):
                self.run_attack_step(p_nat)
        model.train()
        if self.perturbation is not None:
            self.run_search_begin()

    def probe_backward(self, masked_mean):
        """The probe's gradient into flat.g and the update of v; False stops the search (fp16 overflow)."""
        self.phase_runs["probe"] += 1
        if self.scaler is None:
            masked_mean.backward()
        else:
            scale = self.grad_scale if self.grad_scale is not None else self.scaler.get_scale()
            (masked_mean * scale).backward()
            self.flat.g.div_(scale)
        if self.dist is not None:
            self.dist.average_(self.flat.g)
        if self.scaler is not None and not bool(torch.isfinite(self.flat.g).all()):
            return False  # fp16 only: an inf in ‖a‖ would put 0·inf = NaN into the weights for good
        self.run_update()
        return True

    def train(self):
        self.phase_runs["train"] += 1
        loss, logits, masked_mean = self.run_train_forward()
        if self.scaler is None:
            masked_mean.backward()
        else:
            self.scaler.scale(masked_mean).backward()
        if self.dist is not None:  # the mean of the per-process means of B/N rows is the global batch mean
            self.dist.average_(self.flat.g)
            self.dist.average_grads_(self.flat.other_params)
        if self.scaler is None:
            self.run_train_update()
        else:
            self.scaler.step(self.optimizer)  # torch's SGD, on the same momentum buffers
            self.scaler.update()
            if self.perturbation is not None:
                self.perturbation.finish()
        return loss, logits

    # ------------------------------------------------------------------------------------- the step
    def _load(self, x, y, generator):
        """Copy the batch into the persistent buffers and draw the attack's random start into them."""
        if self.buffers is None or self.buffers["x"].shape != x.shape or self.buffers["y"].shape != y.shape:
            if self.graphs is not None and self.buffers is not None:
                raise ValueError(f"x: the captured step was built for batches of {tuple(self.buffers['x'].shape)}"
                                 f", got {tuple(x.shape)} (batches need drop_last)")
            fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.contiguous_format
            new = lambda shape, dtype=x.dtype: torch.empty(shape, dtype=dtype, device=x.device)  # noqa: E731
            self.buffers = {"x": new(x.shape).contiguous(memory_format=fmt), "y": new(y.shape, y.dtype),
                            "x_adv": new(x.shape).contiguous(memory_format=fmt),
                            "noise": new(x.shape, torch.float32).contiguous(memory_format=fmt),  # fp32 draws
                            "radius": new(x.shape[:1], torch.float32) if self.cfg.norm == "l2" else None}
            self.buffers["leaf"] = input_leaf(self.buffers["x_adv"])  # the attack's gradient is taken here
        b = self.buffers
        b["x"].copy_(x)
        b["y"].copy_(y)
        if self.cfg.method == "at":
            noise, radius = draw_random_init_noise(x, self.cfg.norm, generator)
            if radius is not None:
                b["radius"].copy_(radius)
        else:
            noise = draw(torch.randn, x.shape, generator, x.device)
        b["noise"].copy_(noise)

    def adversarial_examples(self, x, y, generator=None):
        """The attack phase alone, on a copy of the batch (benchmarks); returns the persistent x_adv."""
        self._load(x, y, generator)
        self.attack()
        return self.buffers["x_adv"]

    def __call__(self, model, optimizer, x, y, cfg, perturb_active=True, generator=None, x_adv=None):
        if model is not self.model or cfg != self.cfg or optimizer is not self.optimizer:
            raise ValueError("model, optimizer, cfg: a FastTrainStep is bound to the model, optimizer and config "
                             "it was built with")
        self.flat.attach_grads()  # a .grad set to None or replaced would leave v = 0
        self.sgd.load_lr()
        if self.scaler is not None:
            self.grad_scale = self.scaler.get_scale()  # one sync per step, as the scaler's own step has
        result = None
        if self.mode == "captured" and x_adv is None:
            result = run_captured(self, x, y, perturb_active, generator)
        captured = self.graphs.last_step_mode if result is not None and self.graphs is not None else None
        if result is None:
            result = self.run_uncaptured(x, y, perturb_active, generator, x_adv)
        self.mode_counts[self.step_mode(captured)] += 1
        return result

    def run_uncaptured(self, x, y, perturb_active, generator, x_adv):
        self._load(x, y, generator)
        if x_adv is None:
            self.attack()
        else:
            self.buffers["x_adv"].copy_(x_adv)
            if self.perturbation is not None:
                self.run_search_begin()
        info = self.search(perturb_active, y.shape[0])
        v = self.perturbation.v_tensors() if self.keep_v and self.perturbation is not None else None
        loss, logits = self.train()
        return self.result(loss, logits, v, info)

    def search(self, perturb_active, batch, forward=None, backward=None):
        """The probes (host loop in WeightPerturbation.search) when this step perturbs; SearchInfo."""
        if self.perturbation is None or not perturb_active:
            return SearchInfo()
        global_batch = batch * (self.dist.world_size if self.dist is not None else 1)
        steps, fractions = self.perturbation.search(forward or self.run_probe_forward,
                                                    backward or self.probe_backward, global_batch)
        return SearchInfo(steps, fractions, self.perturbation.v_norm_ratio)

    def result(self, loss, logits, v, info):
        """The StepResult, with copies of what the next step overwrites (3 copies: loss, logits, x_adv)."""
        if info.mask_fractions:
            info.v_norm_ratio = info.v_norm_ratio.clone()
        return StepResult(loss.clone(), logits.clone(), self.buffers["x_adv"].clone(), v, info)
