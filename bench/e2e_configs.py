"""The end-to-end suite's matrix: variants, methods and regimes, the plans, and one row's config and step.

What one timed step is: ``step(model, optimizer, x, y, cfg)`` with ``train_step_ref``'s signature, on
synthetic CIFAR-shaped batches (3×32×32 uint8 → [0, 1], 10 classes, two batches cycled, already on the
device: the data pipeline is not timed). L∞ PGD-10 (ε 8/255, α 2/255), K2 = 10, γ = 0.01, SGD lr 0.1
momentum 0.9 wd 5e-4. Methods and probe regimes (rows ``method``/``regime``):
  * ``at``: plain PGD-10 AT;
  * ``at-awp``: one ascent probe on the full loss, per-layer norm (the released AWP code);
  * ``at-rwp`` ``all``: c_min = inf (RunConfig accepts it), so the LSC mask [0, inf) holds every example
    and all K2 probes run: the worst case, where SPEC.md §6's cost model applies in full;
  * ``at-rwp`` ``break``: c_min = 0, the mask [0, 0) is empty at the first probe and the search breaks
    after one forward (the released code has no break and runs all K2 probes anyway).
  RWP rows use the global norm of the released RWP code (``norm_scope='global'``) for every variant.

Variants, timed in the same process on the same device:
  * ``released``: ``bench/released_baseline.py``, the released code's structure (fp32, proxy copies
    refreshed by ``load_state_dict`` every iteration, per-layer Python loops, weight gradients in the
    attack: SPEC.md §6);
  * ``reference``: ``rwp_fast.reference.train_step_ref``, the oracle trainer (fp32, eager);
  * ``fast``: ``FastTrainStep`` as the trainer builds it by default (on CUDA: bf16 autocast, compiled phases
    captured as CUDA graphs (``compile_mode='auto'``: ``step.mode == 'captured'``), channels-last, fused ops
    via backend auto, input-only attack gradients; on CPU the same class with its CPU defaults: fp32, eager,
    contiguous, torch ops);
  * ``compiled``: ``fast`` with ``compile_mode='default'``: the phases compiled, not captured, the baseline
    that shows what the capture buys. On CPU it is ``compile=True`` with Inductor's C++ backend: minutes of
    C++ compilation, so a ``--smoke`` run on CPU gives it a row "skipped: …" (``SMOKE_SKIP``); a run
    without ``--smoke`` measures it;
  * ablations, ``fast`` with one switch off: ``no-amp`` (fp32), ``no-channels-last``, ``no-compile`` (on CUDA:
    the eager phase bodies captured), ``no-fused`` (backend torch), ``no-input-only`` (weights not frozen in
    the attack).
A row whose step was to be captured but ran the compiled phases (a capture that raised: one RuntimeWarning,
``step.mode == 'compiled'``) records ``fallback`` and says so in its note.

``RWP_FAST_COMPILE_BACKEND`` (e.g. ``aot_eager``; read by ``compile_backend`` alone): the bench compiles every
phase with that torch.compile backend instead of Inductor, and the fast family compiles on CPU too (its CPU
default is eager), ``compiled`` included in a ``--smoke`` run. ``bench/device_run.sh --dry-run`` sets it, so
that a phase that does not trace on this torch fails on CPU as it would on the GPU (aot_eager runs the same
Dynamo tracing and AOT autograd as Inductor, in seconds, without Inductor's C++ code generation).

``bench_dist.py`` times the ``fast`` variant of the same configs on N processes, uncaptured (N processes do
not capture; its 1-process baseline does not either).
"""

import contextlib
import math
import os

import torch

from rwp_fast.bench.released_baseline import ReleasedTrainStep
from rwp_fast.config import RunConfig
from rwp_fast.data import make_synthetic
from rwp_fast.data import dataset_stats
from rwp_fast.models import build_model
from rwp_fast.ops import dispatch
from rwp_fast.reference import train_step_ref
from rwp_fast.train.fast_step import FastTrainStep, capture_refusal, resolve_fast_settings

FAST = dict(backend="auto", precision="auto", compile=None, channels_last=None, input_only_grads=True,
            compile_mode="auto")
EAGER_FP32 = dict(precision="fp32", compile=False, channels_last=False)
VARIANT_SETTINGS = {
    "released": dict(EAGER_FP32, backend="reference", input_only_grads=False),
    "reference": dict(EAGER_FP32, backend="reference", input_only_grads=True),
    "fast": FAST,
    # the compiled phases without the capture: what capturing them buys
    "compiled": dict(FAST, compile=True, compile_mode="default"),
    "no-amp": dict(FAST, precision="fp32"),
    "no-channels-last": dict(FAST, channels_last=False),
    "no-compile": dict(FAST, compile=False),
    "no-fused": dict(FAST, backend="torch"),
    "no-input-only": dict(FAST, input_only_grads=False),
}
NOT_IMPLEMENTED = {}
# Variants with nothing to measure off CUDA (on CPU they would silently equal another variant): a row with
# the reason instead. None at present: the captured mode is `fast` itself, which has a CPU meaning (eager).
CUDA_ONLY = {}
# Variants a --smoke run on CPU does not run, with the reason (a run without --smoke does).
SMOKE_SKIP = {
    "compiled": "skipped: --smoke on CPU: Inductor's C++ compilation of every phase takes minutes; "
                "run without --smoke (e.g. --variants released,compiled) to measure it",
}
VARIANTS = tuple(VARIANT_SETTINGS) + tuple(NOT_IMPLEMENTED)
FAST_FAMILY = ("fast", "compiled", "no-amp", "no-channels-last", "no-compile", "no-fused", "no-input-only")


def compile_backend():
    """The torch.compile backend the bench compiles with: ``RWP_FAST_COMPILE_BACKEND`` (e.g. 'aot_eager'), or
    None for torch's default (Inductor). The one place that reads the variable."""
    return os.environ.get("RWP_FAST_COMPILE_BACKEND", "").strip() or None


@contextlib.contextmanager
def compiling_with_backend():
    """While active, torch.compile compiles with ``compile_backend()`` (nothing changes when it is None).

    FastTrainStep's phases call ``torch.compile(fn, fullgraph=..., mode=...)`` at construction and again when a
    phase falls back from fullgraph, so the whole suite runs inside this (as tests/test_hot_path.py's fixture).
    ``mode`` is Inductor's option; another backend is given none."""
    backend = compile_backend()
    if backend is None:
        yield None
        return
    real_compile = torch.compile

    def compile_with_backend(model=None, *, mode=None, **kwargs):
        kwargs.setdefault("backend", backend)
        return real_compile(model, **kwargs) if model is not None else real_compile(**kwargs)
    torch.compile = compile_with_backend
    try:
        yield backend
    finally:
        torch.compile = real_compile


def skip_reason(variant, device, smoke):
    """Why a variant gets no measurement on `device` ("skipped: ..." / "not implemented: ..."), or None.
    A --smoke run on CPU runs ``compiled`` when ``compile_backend()`` names a quick backend."""
    cpu = torch.device(device).type != "cuda"
    smoke_skip = SMOKE_SKIP.get(variant) if cpu and smoke and compile_backend() is None else None
    return NOT_IMPLEMENTED.get(variant) or (CUDA_ONLY.get(variant) if cpu else None) or smoke_skip


def planned_mode(variant, cfg, device):
    """How the step of a variant runs on `device`: 'captured', 'compiled' or 'eager' (FastTrainStep.mode as
    decided at construction, in one process); released and reference are eager."""
    if variant in ("released", "reference"):
        return "eager"
    device = torch.device(device)
    precision, compile_model, _ = resolve_fast_settings(cfg, device)
    if cfg.compile_mode in ("auto", "cuda-graphs") and capture_refusal(cfg, device, precision, None) is None:
        return "captured"
    return "compiled" if compile_model else "eager"


# method key → (method label, regime label, config fields). Order = measurement priority in a unit.
METHODS = {
    "at-rwp-all": ("at-rwp", "all", dict(perturb="rwp", c_min=math.inf, norm_scope="global")),
    "at": ("at", "-", dict(perturb="none")),
    "at-rwp-break": ("at-rwp", "break", dict(perturb="rwp", c_min=0.0, norm_scope="global")),
    "at-awp": ("at-awp", "-", dict(perturb="awp", norm_scope="layer")),
}
REGIME_HELP = {"all": "c_min=inf: all K2 probes run", "break": "c_min=0: break at the first probe"}

ISSUE_CONFIGS = (("preact_resnet18", 128), ("preact_resnet18", 512), ("wrn-34-10", 128))
# A prioritised subset for a longer GPU window (--plan device), most important first: a time budget cuts from
# the end. bench/device_run.sh runs its own two `rwp-fast bench` parts (headline, variants) instead.
DEVICE_PLAN = (
    ("preact_resnet18", 128, "released"), ("preact_resnet18", 128, "fast"),
    ("preact_resnet18", 128, "compiled"),
    ("wrn-34-10", 128, "released"), ("wrn-34-10", 128, "fast"),
    ("preact_resnet18", 512, "released"), ("preact_resnet18", 512, "fast"),
    ("preact_resnet18", 128, "reference"), ("wrn-34-10", 128, "reference"),
    ("preact_resnet18", 128, "no-input-only"), ("preact_resnet18", 128, "no-compile"),
    ("preact_resnet18", 128, "no-amp"), ("preact_resnet18", 128, "no-channels-last"),
    ("preact_resnet18", 128, "no-fused"),
)
SMOKE_MODEL, SMOKE_BATCH = "small_cnn", 8


def make_cfg(model, batch, method_key, variant, device, smoke=False):
    """The RunConfig of one row. smoke: K1 = 2, K2 = 3 (seconds on a CPU)."""
    kw = dict(dataset="synthetic", model=model, norm="linf", epsilon_255=8.0, alpha_255=2.0, method="at",
              attack_steps=2 if smoke else 10, k2=3 if smoke else 10, gamma=0.01, batch_size=batch, lr=0.1,
              momentum=0.9, weight_decay=5e-4, device=torch.device(device).type)
    kw.update(METHODS[method_key][2])
    kw.update(VARIANT_SETTINGS.get(variant, FAST))
    if compile_backend() is not None and kw.get("compile", False) is None:
        kw["compile"] = True  # a named backend: the fast family compiles on every device (CPU: eager otherwise)
    return RunConfig(**kw).validate()


def expected_probes(cfg, variant):
    """Probe forwards per step: 0 (AT), 1 (AWP, or RWP breaking at once), K2 (RWP all / released)."""
    if cfg.perturb == "none":
        return 0
    if cfg.perturb == "awp":
        return 1
    if variant == "released" or cfg.c_min > 0:
        return cfg.k2
    return 1


def build(model_name, device, seed=0):
    """The row's model, seeded: every variant of a row starts from the same weights."""
    torch.manual_seed(seed)
    mean, std = dataset_stats("synthetic", 3)
    return build_model(model_name, 10, 3, mean, std).to(device)


def make_batches(batch, device, n_batches=2, seed=0):
    """n_batches synthetic CIFAR-shaped (x (B, 3, 32, 32) fp32 in [0, 1], y (B,) int64) on `device`."""
    (x, y), _, _ = make_synthetic(n_train=batch * n_batches, n_test=1, seed=seed)
    x = x.to(device).float().div_(255)
    y = y.to(device)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(n_batches)]


def make_step(variant, model, cfg, device):
    """(step function, optimizer) for a variant; the optimizer is the trainer's SGD.

    Fast variants: ``set_backend(cfg.backend)`` for the whole process, as ``Trainer`` does. FastTrainStep
    passes cfg.backend to lsc_loss and weight_perturb, but the attack (``rwp_fast.attacks.pgd``) calls
    ``pgd_step_`` without it, so without this 'no-fused' would still run the fused PGD step.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if variant == "released":
        return ReleasedTrainStep(model, cfg), optimizer
    if variant == "reference":
        return train_step_ref, optimizer
    dispatch.set_backend(cfg.backend)
    return FastTrainStep(model, optimizer, cfg, device), optimizer


def resolved_settings(variant, cfg, device):
    """What actually runs: precision, compile, channels-last, input-only, backend per fused op, step mode."""
    if variant in ("released", "reference"):
        return dict(precision="fp32", compile=False, channels_last=False,
                    input_only=variant == "reference", backends="none (plain torch)", mode="eager")
    device = torch.device(device)
    precision, compile_model, channels_last = resolve_fast_settings(cfg, device)
    # make_step sets the process-wide backend to cfg.backend, as the Trainer does
    backends = {op: dispatch.choose_backend(op, device, cfg.backend) for op in dispatch.OPS}
    return dict(precision=precision, compile=compile_model, channels_last=channels_last,
                input_only=cfg.input_only_grads, backends=backends, compile_mode=cfg.compile_mode,
                compile_backend=(compile_backend() or "inductor") if compile_model else None,
                mode=planned_mode(variant, cfg, device))


def build_plan(args):
    """[(model, batch, variant)] in measurement order."""
    if args.smoke:
        models = args.models or [SMOKE_MODEL]
        batches = args.batch_sizes or [SMOKE_BATCH]
        units = [(m, b, v) for m in models for b in batches for v in VARIANTS]
    elif args.models or args.batch_sizes:
        models = args.models or ["preact_resnet18"]
        batches = args.batch_sizes or [128]
        units = [(m, b, v) for m in models for b in batches for v in VARIANTS]
    elif args.plan == "device":
        units = list(DEVICE_PLAN)
    else:
        units = [(m, b, v) for m, b in ISSUE_CONFIGS for v in VARIANTS]
    return [u for u in units if u[2] in args.variants]

