"""End-to-end throughput: images/s of full training steps (PGD attack + weight perturbation + SGD update).

    python -m bench --device cuda --json out/e2e.json            # the issue's matrix (long)
    python -m bench --device cuda --plan device --time-budget 300  # prioritised subset (device_run.sh)
    python -m bench --smoke --json /tmp/e2e_smoke.json            # CPU, seconds; claims no figure

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
  * ``fast``: ``FastTrainStep`` with every switch on (on CUDA: bf16 autocast, torch.compile, channels-last,
    fused ops via backend auto, input-only attack gradients; on CPU the same class with its CPU defaults:
    fp32, eager, contiguous, torch ops — inductor on CPU needs minutes of C++ compilation for nothing);
  * ablations, ``fast`` with one switch off: ``no-amp`` (fp32), ``no-channels-last``, ``no-compile``,
    ``no-fused`` (backend torch), ``no-input-only`` (weights not frozen in the attack);
  * launch overhead (issue 17): ``reduce-overhead`` (``torch.compile`` CUDA-graph trees for every forward
    and backward) and ``cuda-graphs`` (the attack and one RWP probe captured as ``torch.cuda.CUDAGraph``s),
    both with the stall-free RWP early break; on CPU each is a row "skipped: …" with the reason. A mode
    that fell back to ``default`` says so in the note.

Launch proxy and host-boundness: ``ops/step`` is the number of aten ops one step dispatches, counted with
a ``TorchDispatchMode`` (``rwp_fast.train.graphs.count_aten_ops``) for every eager row (a CUDA build
launches roughly one kernel per aten op in eager mode; a dispatch mode does not see inside compiled code).
On CUDA each row also has ``host_ms_per_step`` (wall clock until the block's last launch returned) and
``gpu_ms_per_step`` (CUDA events around the block): host ≈ GPU time means the GPU waited for the host.
Neither says how long the GPU worked, so one more step runs under ``torch.profiler``: ``gpu_busy_ms_per_step``
is the sum of its kernels' and copies' device time, and ``gpu_busy_fraction`` = busy / wall step time (1.0:
GPU-bound; 0.1: the GPU idles 90% of the step). ``cudagraph_skips`` counts Inductor's skipped cudagraph
trees during the row (``reduce-overhead`` only logs a skip, so a row labelled captured may not be).

Timing: ``warmup`` untimed steps first (the first compiled step compiles), then ``repeats`` blocks of
``steps`` steps, each block between two ``torch.cuda.synchronize()``; images/s is the median over the
blocks. Rows record whether dynamo compiled new graphs during the timed blocks (``recompiles``).

FLOPs and the hardware limit. ``torch.utils.flop_counter.FlopCounterMode`` counts the conv and matmul
FLOPs of ONE step of each configuration, eager and fp32 (counting needs eager: a dispatch mode does not
see inside inductor's kernels). Conv and matmul FLOPs are exactly linear in the batch, so the count runs
at batch 16 and is scaled to B. Two numbers per row:
  * ``flops_own``: the work that variant does. ``released`` does more than the others: weight gradients
    in every attack step (≈ K1·3 instead of K1·2 forward units), the extra restart-selection forward,
    and all K2 probes in the ``break`` regime. ``no-input-only`` counts fast + K1 × the attack's
    weight-gradient FLOPs, because its compiled backward computes them (see the check below), while an
    eager count would not show them;
  * ``flops_useful``: the fast path's count for the same method and regime, used for every variant's
    TFLOP/s and MFU, so that the MFU of all variants compares like with like (a variant cannot raise its
    MFU by doing useless work).
The ceiling is measured in the same run: a bf16 8192×8192 matmul (``triton.testing.do_bench`` through
``bench.common.time_us``); MFU = useful TFLOP/s ÷ that ceiling. On CPU no ceiling and no MFU
are given (an fp32 512² matmul gave "MFU" above 100%).

The input-only-gradient claim (row ``check``, "attack weight-grad work: eager skips? compiled skips?";
measured after the timings, which come first under a time budget):
  * eager: FlopCounterMode over one attack step (forward + ``autograd.grad`` w.r.t. the input) with the
    weights frozen, not frozen, and the released ``loss.backward()``. Eager ``autograd.grad`` already prunes
    the weight-gradient convolutions (frozen = unfrozen), ``backward()`` does not (≈ 3/2 of it);
  * compiled: FlopCounterMode cannot see into inductor's kernels, so the compiled backward graph itself is
    inspected (``aot_autograd`` with a capturing backward compiler): the ``output_mask`` of every
    ``convolution_backward`` says whether it computes the weight gradient. On CUDA the real inductor
    attack of ``fast`` and ``no-input-only`` is also profiled (``torch.profiler``; kernels whose name
    contains "wgrad", the cuDNN naming) and timed.

Targets (TARGET_SPEEDUP, TARGET_RATIO; reported "met"/"missed", never asserted): fast ≥ 8× released on
PreAct ResNet-18, batch 128, AT-RWP all probes; fast-path AT-RWP ÷ AT step time ≤ 2.3 (the all-probes regime,
the worst case; the break regime is listed too).

CPU smoke runs use one intra-op thread (robust on a shared machine) and claim nothing.

Output: a markdown table (variant, model, batch, method, regime, images/s, ×released, TFLOP/s, MFU),
``--json PATH`` (rewritten after every configuration, so a timeout keeps what was measured), and on a
real CUDA run the rows are appended to ``bench/results/e2e.jsonl`` with the GPU name, torch/triton/CUDA
versions, date, git commit, command and full config. ``--smoke`` never writes to bench/results.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Relative: this package is `bench` in a checkout (python -m bench) and `rwp_fast.bench` when installed.
from . import common
from .released_baseline import ReleasedTrainStep

from rwp_fast.attacks.pgd import frozen
from rwp_fast.config import RunConfig
from rwp_fast.data import make_synthetic
from rwp_fast.models import build_model, dataset_stats
from rwp_fast.ops import dispatch
from rwp_fast.reference import train_step_ref
from rwp_fast.train.fast_step import FastTrainStep, resolve_fast_settings
from rwp_fast.train.graphs import count_aten_ops

RESULTS = os.path.join(common.REPO, "bench", "results", "e2e.jsonl")
SMOKE_LABEL = "smoke, not a measurement"

# ------------------------------------------------------------------------------------------- the matrix
FAST = dict(backend="auto", precision="auto", compile=None, channels_last=None, input_only_grads=True)
EAGER_FP32 = dict(precision="fp32", compile=False, channels_last=False)
VARIANT_SETTINGS = {
    "released": dict(EAGER_FP32, backend="reference", input_only_grads=False),
    "reference": dict(EAGER_FP32, backend="reference", input_only_grads=True),
    "fast": FAST,
    "no-amp": dict(FAST, precision="fp32"),
    "no-channels-last": dict(FAST, channels_last=False),
    "no-compile": dict(FAST, compile=False),
    "no-fused": dict(FAST, backend="torch"),
    "no-input-only": dict(FAST, input_only_grads=False),
    # launch overhead (issue 17): Inductor's CUDA-graph trees, and explicit capture of attack + one probe
    "reduce-overhead": dict(FAST, compile_mode="reduce-overhead"),
    "cuda-graphs": dict(FAST, compile_mode="cuda-graphs"),
}
NOT_IMPLEMENTED = {}
# Variants with nothing to measure off CUDA (on CPU they would silently fall back to 'fast'): a row with
# the reason instead.
CUDA_ONLY = {
    "reduce-overhead": "skipped: CUDA-graph trees need a CUDA device",
    "cuda-graphs": "skipped: torch.cuda.CUDAGraph capture needs a CUDA device",
}
VARIANTS = tuple(VARIANT_SETTINGS) + tuple(NOT_IMPLEMENTED)
FAST_FAMILY = ("fast", "no-amp", "no-channels-last", "no-compile", "no-fused", "no-input-only", "reduce-overhead",
               "cuda-graphs")

# method key → (method label, regime label, config fields). Order = measurement priority in a unit.
METHODS = {
    "at-rwp-all": ("at-rwp", "all", dict(perturb="rwp", c_min=math.inf, norm_scope="global")),
    "at": ("at", "-", dict(perturb="none")),
    "at-rwp-break": ("at-rwp", "break", dict(perturb="rwp", c_min=0.0, norm_scope="global")),
    "at-awp": ("at-awp", "-", dict(perturb="awp", norm_scope="layer")),
}
REGIME_HELP = {"all": "c_min=inf: all K2 probes run", "break": "c_min=0: break at the first probe"}

ISSUE_CONFIGS = (("preact_resnet18", 128), ("preact_resnet18", 512), ("wrn-34-10", 128))
# The one-shot GPU script's subset, most important first: a time budget cuts from the end.
DEVICE_PLAN = (
    ("preact_resnet18", 128, "released"), ("preact_resnet18", 128, "fast"),
    ("preact_resnet18", 128, "reduce-overhead"), ("preact_resnet18", 128, "cuda-graphs"),
    ("wrn-34-10", 128, "released"), ("wrn-34-10", 128, "fast"),
    ("preact_resnet18", 512, "released"), ("preact_resnet18", 512, "fast"),
    ("preact_resnet18", 128, "reference"), ("wrn-34-10", 128, "reference"),
    ("preact_resnet18", 128, "no-input-only"), ("preact_resnet18", 128, "no-compile"),
    ("preact_resnet18", 128, "no-amp"), ("preact_resnet18", 128, "no-channels-last"),
    ("preact_resnet18", 128, "no-fused"),
)
SMOKE_MODEL, SMOKE_BATCH = "small_cnn", 8

TARGET_SPEEDUP = 8.0   # fast ÷ released, PreAct ResNet-18 b128 AT-RWP all probes (issue 24's target)
TARGET_RATIO = 2.3     # fast path AT-RWP ÷ AT step time (issue 24's target)
COUNT_BATCH = 16       # FLOPs are counted at this batch and scaled linearly to B


def make_cfg(model, batch, method_key, variant, device, smoke=False):
    """The RunConfig of one row. smoke: K1 = 2, K2 = 3 (seconds on a CPU)."""
    kw = dict(dataset="synthetic", model=model, norm="linf", epsilon=8.0, alpha=2.0, method="at",
              attack_steps=2 if smoke else 10, k2=3 if smoke else 10, gamma=0.01, batch_size=batch, lr=0.1,
              momentum=0.9, weight_decay=5e-4, device=torch.device(device).type)
    kw.update(METHODS[method_key][2])
    kw.update(VARIANT_SETTINGS.get(variant, FAST))
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
    """What actually runs: precision, compile, channels-last, input-only, backend per fused op."""
    if variant in ("released", "reference"):
        return dict(precision="fp32", compile=False, channels_last=False,
                    input_only=variant == "reference", backends="none (plain torch)")
    device = torch.device(device)
    precision, compile_model, channels_last = resolve_fast_settings(cfg, device)
    # make_step sets the process-wide backend to cfg.backend, as the Trainer does
    backends = {op: dispatch.choose_backend(op, device, cfg.backend) for op in dispatch.OPS}
    return dict(precision=precision, compile=compile_model, channels_last=channels_last,
                input_only=cfg.input_only_grads, backends=backends, compile_mode=cfg.compile_mode)


# ------------------------------------------------------------------------------------------- FLOPs
class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker: its backward hooks raise on ``autograd.grad`` with
    respect to a leaf input ("A leaf node was passed to _will_engine_execute_node", torch 2.14), which is
    exactly the attack's call. Only the global count is used here, so the per-module split is dropped."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracker()
    return counter


def _op_counts(counter):
    return {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}


def count_step_flops(family, model_name, method_key, device, smoke=False):
    """Conv + matmul FLOPs of one training step per image, eager fp32, counted at batch 16.

    family: 'released', 'reference' or 'fast' (the fast path with fp32, eager, torch ops: the same
    math as every fast variant; input-only gradients on).
    """
    batch = COUNT_BATCH
    variant = "no-compile" if family == "fast" else family
    cfg = make_cfg(model_name, batch, method_key, variant, device, smoke)
    if family == "fast":
        cfg = cfg.replace(precision="fp32", channels_last=False, backend="torch").validate()
    model = build(model_name, device)
    step, optimizer = make_step(variant, model, cfg, device)
    (x, y), = make_batches(batch, device, n_batches=1, seed=1)
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        with flop_counter() as counter:
            step(model, optimizer, x, y, cfg, True, generator)
    finally:
        dispatch.set_backend(None)
    return counter.get_total_flops() / batch


def attack_step_flops(model, x, y):
    """FLOPs of one attack step (forward + gradient w.r.t. the input), eager, three ways:
    'frozen' (autograd.grad, weights requires_grad=False: the fast path), 'unfrozen' (autograd.grad with
    trainable weights) and 'backward' (loss.backward(), the released code). Returns {mode: (total, per-op)}.
    """
    params = list(model.parameters())
    out = {}
    for mode in ("frozen", "unfrozen", "backward"):
        x_adv = x.detach().clone().requires_grad_(True)
        with frozen(params) if mode == "frozen" else contextlib.nullcontext(), flop_counter() as counter:
            loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
            if mode == "backward":
                loss.backward()
            else:
                torch.autograd.grad(loss, x_adv)
        model.zero_grad(set_to_none=True)
        out[mode] = (counter.get_total_flops(), _op_counts(counter))
    return out


def compiled_conv_weight_grads(model, x, y, freeze):
    """(convolution_backward nodes, how many compute a weight gradient) in the backward graph that
    torch.compile builds for one attack step: AOTAutograd's joint graph, captured by a backward compiler
    that only records it (the same partition inductor receives; no C++ compiler needed)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _inputs: make_boxed_func(gm.forward), bw_compiler=keep)
    _dynamo_reset()
    try:
        compiled = torch.compile(model, backend=backend)
        with frozen(list(model.parameters())) if freeze else contextlib.nullcontext():
            x_adv = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(compiled(x_adv).float(), y, reduction="sum")
            torch.autograd.grad(loss, x_adv)
    finally:
        _dynamo_reset()
    masks = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and "convolution_backward" in str(node.target):
                masks.append(node.kwargs.get("output_mask", node.args[10] if len(node.args) > 10 else None))
    return len(masks), sum(1 for m in masks if m is not None and m[1])


def attack_check(model_name, device, inspect_compiled=True):
    """The 'attack weight-grad work' evidence for one model, at batch 16. Returns a dict."""
    model = build(model_name, device).train()
    (x, y), = make_batches(COUNT_BATCH, device, n_batches=1, seed=2)
    flops = attack_step_flops(model, x, y)
    res = {"model": model_name, "count_batch": COUNT_BATCH,
           "eager_flops": {m: t for m, (t, _) in flops.items()},
           "eager_flops_by_op": {m: ops for m, (_, ops) in flops.items()}}
    # weight-gradient FLOPs of one attack step, per image: what a backward without input-only skipping adds
    res["wgrad_flops_per_image"] = (flops["backward"][0] - flops["frozen"][0]) / COUNT_BATCH
    if inspect_compiled:
        res.update(compiled_check(model, x, y))
    return res


def compiled_check(model, x, y):
    """{'compiled_frozen': (n, with weight grad), 'compiled_unfrozen': (...)} or {'compiled_error': ...}."""
    try:
        return {"compiled_frozen": compiled_conv_weight_grads(model, x, y, True),
                "compiled_unfrozen": compiled_conv_weight_grads(model, x, y, False)}
    except Exception as exc:  # noqa: BLE001  the eager half of the check still stands
        return {"compiled_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def profile_attack(step, x, y, generator, device):
    """CUDA only: time one compiled attack and count its kernels, and those named like cuDNN wgrad."""
    from torch.profiler import ProfilerActivity, profile
    step.adversarial_examples(x, y, generator)
    common.sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        step.adversarial_examples(x, y, generator)
    common.sync(device)
    attack_ms = 1e3 * (time.perf_counter() - t0) / 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step.adversarial_examples(x, y, generator)
        common.sync(device)
    kernels = [e for e in prof.key_averages()
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return {"attack_ms": round(attack_ms, 3), "attack_kernels": sum(e.count for e in kernels),
            "attack_wgrad_kernels": sum(e.count for e in kernels if "wgrad" in e.key.lower()),
            "attack_dgrad_kernels": sum(e.count for e in kernels if "dgrad" in e.key.lower())}


def profile_gpu_busy_ms(run_step, device):
    """CUDA only: the device time (ms) of one step's kernels and memory copies, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
        common.sync(device)
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.self_device_time_total for e in prof.key_averages()
               if getattr(e, "device_type", None) == cuda) / 1e3


def _cudagraph_skips():
    try:
        from torch._dynamo.utils import counters
        return sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
    except Exception:  # noqa: BLE001  only a diagnostic
        return None


def matmul_ceiling(device):
    """(TFLOP/s, description): bf16 8192² matmul on CUDA; (None, why) on CPU: no MFU is given there.

    A CPU "ceiling" from one fp32 512² matmul sat below what the convolutions reach (MFU of 95-128% was
    printed), and no single CPU matmul is a meaningful peak on a shared machine.
    """
    if torch.device(device).type != "cuda":
        return None, "none on CPU: no MFU is reported there"
    n, dtype = 8192, torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    p50_us = common.time_us(lambda: torch.mm(a, b, out=c), device)[0]
    return 2 * n ** 3 / (p50_us * 1e-6) / 1e12, f"{str(dtype).split('.')[-1]} {n}x{n} matmul"


# ---------------------------------------------------------------------------------------- measuring
def _dynamo_reset():
    import torch._dynamo
    torch._dynamo.reset()


def _compiled_graphs():
    try:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]
    except Exception:  # noqa: BLE001  only a diagnostic
        return None


def time_steps(step, model, optimizer, cfg, batches, device, warmup, steps, repeats):
    """Run `warmup` steps, then `repeats` synchronised blocks of `steps` steps; returns a dict."""
    generator = torch.Generator(device=device).manual_seed(0)
    counter = iter(range(1 << 30))
    cuda = torch.device(device).type == "cuda"

    def one():
        x, y = batches[next(counter) % len(batches)]
        return step(model, optimizer, x, y, cfg, True, generator)

    t0 = time.perf_counter()
    result = None
    for _ in range(warmup):
        result = one()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    graphs_before = _compiled_graphs()
    seconds, host_s, gpu_ms = [], [], []
    for _ in range(repeats):
        common.sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        for _ in range(steps):
            result = one()
        # host time: until the last launch returned (any sync inside a step is included); GPU time: the
        # events around the block. host ≈ GPU time means the GPU waited for the host (host-bound).
        host_s.append(time.perf_counter() - t)
        if cuda:
            end.record()
        common.sync(device)
        seconds.append(time.perf_counter() - t)
        if cuda:
            gpu_ms.append(start.elapsed_time(end))
    graphs_after = _compiled_graphs()
    recompiles = None if graphs_before is None else graphs_after - graphs_before
    return {"seconds": seconds, "warmup_s": warmup_s, "result": result, "recompiles": recompiles,
            "host_ms": 1e3 * statistics.median(host_s) / steps,
            "gpu_ms": statistics.median(gpu_ms) / steps if gpu_ms else None}


def _probes(result):
    info = result.search
    fractions = getattr(info, "mask_fractions", None) or []
    return len(fractions) if fractions else int(getattr(info, "steps_taken", 0) or 0)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Suite:
    """Runs a plan of (model, batch, variant) units, each over the selected methods; collects rows."""

    def __init__(self, args, meta, device):
        self.args, self.meta, self.device = args, meta, torch.device(device)
        self.rows = []
        self.flops_cache = {}
        self.checks = {}
        self.t0 = time.perf_counter()

    # -- bookkeeping
    def elapsed(self):
        return time.perf_counter() - self.t0

    def out_of_time(self):
        return self.args.time_budget > 0 and self.elapsed() > self.args.time_budget

    def log(self, msg):
        print(f"[e2e {self.elapsed():6.0f}s] {msg}", file=sys.stderr, flush=True)

    def base_row(self, model, batch, variant, method_key, cfg=None):
        method, regime, _ = METHODS[method_key]
        row = {**self.meta, "kind": "e2e", "smoke": self.args.smoke, "variant": variant, "model": model,
               "batch": batch, "method": method, "regime": regime, "method_key": method_key,
               "images_per_s": None, "note": ""}
        if cfg is not None:
            row["config"] = cfg.to_dict()
        return row

    def append(self, row):
        if self.args.smoke:
            row["note"] = "; ".join(filter(None, [SMOKE_LABEL, row["note"]]))
        self.rows.append(row)
        self.flush()

    def flush(self):
        if self.args.json:
            common.write_json(_jsonable(self.rows), self.args.json)

    # -- FLOPs
    def flops_per_image(self, family, model_name, method_key):
        key = (family, model_name, method_key)
        if key not in self.flops_cache:
            try:
                self.flops_cache[key] = count_step_flops(family, model_name, method_key, self.device,
                                                         self.args.smoke)
            except Exception as exc:  # noqa: BLE001  a row without FLOPs is still a timing
                self.log(f"FLOP count {key} failed: {type(exc).__name__}: {exc}")
                self.flops_cache[key] = None
        return self.flops_cache[key]

    def check_for(self, model_name, inspect_compiled):
        check = self.checks.get(model_name)
        try:
            if check is None:
                check = self.checks[model_name] = attack_check(model_name, self.device, inspect_compiled)
            elif inspect_compiled and "error" not in check and "compiled_frozen" not in check \
                    and "compiled_error" not in check:
                model = build(model_name, self.device).train()
                (x, y), = make_batches(COUNT_BATCH, self.device, n_batches=1, seed=2)
                check.update(compiled_check(model, x, y))
        except Exception as exc:  # noqa: BLE001
            check = self.checks[model_name] = {"model": model_name, "error": f"{type(exc).__name__}: {exc}"}
        return check

    def add_flops(self, row, variant, model_name, method_key, cfg):
        useful = self.flops_per_image("fast", model_name, method_key)
        family = variant if variant in ("released", "reference") else "fast"
        own = self.flops_per_image(family, model_name, method_key) if family != "fast" else useful
        if variant == "no-input-only" and own is not None:
            wgrad = self.check_for(model_name, inspect_compiled=False).get("wgrad_flops_per_image")
            own = None if wgrad is None else own + cfg.attack_steps * wgrad
        batch = row["batch"]
        row["flops_per_step_useful"] = None if useful is None else useful * batch
        row["flops_per_step_own"] = None if own is None else own * batch
        ips, ceiling = row["images_per_s"], self.meta.get("ceiling_tflops")
        for name, per_image in (("", useful), ("_own", own)):
            tflops = None if per_image is None or not ips else per_image * ips / 1e12
            row["tflops" + name] = tflops
            row["mfu" + name] = tflops / ceiling if tflops is not None and ceiling else None

    # -- one unit: a model instance of one variant, measured over the methods
    def run_unit(self, model_name, batch, variant, batches):
        args, device = self.args, self.device
        methods = [m for m in METHODS if m in args.methods]
        skip = NOT_IMPLEMENTED.get(variant) or (CUDA_ONLY.get(variant) if device.type != "cuda" else None)
        if skip:
            for m in methods:
                row = self.base_row(model_name, batch, variant, m)
                row["note"] = skip
                self.append(row)
            return
        model = None
        for method_key in methods:
            cfg = make_cfg(model_name, batch, method_key, variant, device, args.smoke)
            row = self.base_row(model_name, batch, variant, method_key, cfg)
            if self.out_of_time():
                row["note"] = f"skipped: time budget ({args.time_budget:.0f}s) spent"
                self.append(row)
                continue
            try:
                if model is None:
                    _dynamo_reset()  # fresh dynamo caches per model instance (recompile limit)
                    model = build(model_name, device)
                    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    model.load_state_dict(initial)  # every method starts from the same weights
                step, optimizer = make_step(variant, model, cfg, device)
                skips_before = _cudagraph_skips()
                # one warm-up step is enough for eager variants; compiled ones compile in the first
                warmup = args.warmup if resolved_settings(variant, cfg, device)["compile"] else min(args.warmup, 1)
                timing = time_steps(step, model, optimizer, cfg, batches, device, warmup, args.steps,
                                    args.repeats)
                ips = [args.steps * batch / s for s in timing["seconds"]]
                row["images_per_s"] = statistics.median(ips)
                row["images_per_s_repeats"] = [round(v, 2) for v in ips]
                row["step_ms"] = 1e3 * batch / row["images_per_s"]
                row["warmup_s"] = round(timing["warmup_s"], 3)
                row["recompiles"] = timing["recompiles"]
                row["host_ms_per_step"], row["gpu_ms_per_step"] = timing["host_ms"], timing["gpu_ms"]
                if getattr(step, "mode", cfg.compile_mode) != cfg.compile_mode:  # a graph mode fell back
                    row["fallback"] = step.mode
                row["steps"], row["repeats"], row["warmup"] = args.steps, args.repeats, warmup
                row["probes"] = _probes(timing["result"])
                # the work behind those probes: the stall-free break runs up to two past the first empty mask
                row["probes_launched"] = getattr(getattr(timing["result"], "search", None), "probes_launched", None)
                row["expected_probes"] = expected_probes(cfg, variant)
                row["settings"] = resolved_settings(variant, cfg, device)
                notes = []
                if row["probes"] != row["expected_probes"]:
                    notes.append(f"probes {row['probes']} != expected {row['expected_probes']}")
                if timing["recompiles"]:
                    notes.append(f"{timing['recompiles']} graph(s) compiled during timing")
                fast_cfg = make_cfg(model_name, batch, method_key, "fast", device, args.smoke)
                if variant in FAST_FAMILY and variant != "fast" \
                        and row["settings"] == resolved_settings("fast", fast_cfg, device):
                    notes.append("same settings as fast on this device")
                if device.type == "cuda" and variant in FAST_FAMILY and method_key == methods[0]:
                    try:
                        row.update(profile_attack(step, *batches[0], torch.Generator(device=device)
                                                  .manual_seed(0), device))
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"attack profile failed: {type(exc).__name__}")
                if device.type == "cuda":
                    gen = torch.Generator(device=device).manual_seed(1)
                    try:
                        one_step = functools.partial(step, model, optimizer, *batches[0], cfg, True, gen)
                        busy = profile_gpu_busy_ms(one_step, device)
                        row["gpu_busy_ms_per_step"] = round(busy, 3)
                        row["gpu_busy_fraction"] = round(busy / row["step_ms"], 4)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"GPU-busy profile failed: {type(exc).__name__}")
                    if skips_before is not None:
                        row["cudagraph_skips"] = _cudagraph_skips() - skips_before
                if row.get("fallback"):
                    notes.append(f"fell back to compile_mode={row['fallback']}")
                if not row["settings"]["compile"]:  # launch proxy: a dispatch mode sees eager ops only
                    row["ops_per_step"] = count_aten_ops(step, model, optimizer, *batches[0], cfg, True,
                                                         torch.Generator(device=device).manual_seed(0))[1].total
                row["note"] = "; ".join(notes)
                self.add_flops(row, variant, model_name, method_key, cfg)
                self.log(f"{model_name} b{batch} {variant:<16} {method_key:<13} "
                         f"{row['images_per_s']:9.1f} img/s  (warm-up {row['warmup_s']:.1f}s)")
                del step, optimizer
            except Exception as exc:  # noqa: BLE001  one broken configuration does not stop the suite
                row["images_per_s"] = None
                row["note"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                self.log(f"{model_name} b{batch} {variant} {method_key}: {row['note']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            self.append(row)
        del model
        dispatch.set_backend(None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the whole plan
    def run(self, units):
        data = {}
        models = []
        for model_name, _, _ in units:
            if model_name not in models:
                models.append(model_name)
        for model_name, batch, variant in units:
            if batch not in data and variant not in NOT_IMPLEMENTED:
                data[batch] = make_batches(batch, self.device)
            self.run_unit(model_name, batch, variant, data.get(batch))
        # after the timings, which have priority under a time budget
        if models and "check" not in self.args.skip:
            if self.out_of_time():
                self.checks.setdefault(models[0], {"model": models[0]})["error"] = \
                    f"skipped: time budget ({self.args.time_budget:.0f}s) spent"
            else:
                self.log(f"attack weight-grad check on {models[0]}")
                self.check_for(models[0], inspect_compiled=True)
        self.rows += summary_rows(self.rows, self.checks, self.meta, self.args.smoke)
        self.flush()
        return self.rows


# ------------------------------------------------------------------------------------------ summary
def _index(rows):
    return {(r["model"], r["batch"], r["method_key"], r["variant"]): r for r in rows
            if r.get("kind") == "e2e" and r.get("images_per_s")}


def _status(ok, smoke, meta):
    """'met'/'missed' only for a real CUDA run: the targets are GPU targets."""
    if smoke:
        return "n/a (smoke)"
    if meta.get("device_type") != "cuda":
        return f"n/a ({meta.get('device_type')}: the targets are GPU targets)"
    return "met" if ok else "missed"


def summary_rows(rows, checks, meta, smoke):
    """Fill ×released into the e2e rows; return the ratio, target and check rows."""
    index = _index(rows)
    for r in rows:
        if r.get("kind") != "e2e" or not r.get("images_per_s"):
            continue
        base = index.get((r["model"], r["batch"], r["method_key"], "released"))
        r["speedup_vs_released"] = r["images_per_s"] / base["images_per_s"] if base else None
    out = []
    configs = sorted({(k[0], k[1], k[3]) for k in index})
    for model, batch, variant in configs:
        at = index.get((model, batch, "at", variant))
        for method_key in ("at-rwp-all", "at-rwp-break", "at-awp"):
            other = index.get((model, batch, method_key, variant))
            if at and other:
                ratio = at["images_per_s"] / other["images_per_s"]
                row = {**meta, "kind": "ratio", "smoke": smoke, "variant": variant, "model": model,
                       "batch": batch, "method_key": method_key, "time_ratio_vs_at": ratio}
                if variant == "fast" and method_key == "at-rwp-all":
                    row["target"] = f"<= {TARGET_RATIO}"
                    row["status"] = _status(ratio <= TARGET_RATIO, smoke, meta)
                out.append(row)
    key = ("preact_resnet18", 128, "at-rwp-all")
    fast, released = index.get(key + ("fast",)), index.get(key + ("released",))
    speedup = fast["images_per_s"] / released["images_per_s"] if fast and released else None
    out.append({**meta, "kind": "target", "smoke": smoke,
                "name": f"fast >= {TARGET_SPEEDUP:g}x released, preact_resnet18 b128 AT-RWP all probes",
                "value": speedup, "target": f">= {TARGET_SPEEDUP}",
                "status": "not measured" if speedup is None
                else _status(speedup >= TARGET_SPEEDUP, smoke, meta)})
    ratio_rows = [r for r in out if r.get("kind") == "ratio" and r.get("target")]
    primary = [r for r in ratio_rows if (r["model"], r["batch"]) == ("preact_resnet18", 128)]
    chosen = primary[0] if primary else (ratio_rows[0] if ratio_rows else None)
    out.append({**meta, "kind": "target", "smoke": smoke,
                "name": f"fast AT-RWP (all probes) / AT step time <= {TARGET_RATIO:g}"
                        + (f", {chosen['model']} b{chosen['batch']}" if chosen else ""),
                "value": chosen["time_ratio_vs_at"] if chosen else None, "target": f"<= {TARGET_RATIO}",
                "status": chosen["status"] if chosen else "not measured"})
    for model, check in checks.items():
        out.append(check_row(check, rows, meta, smoke))
    return out


def check_row(check, rows, meta, smoke):
    """The row 'attack weight-grad work: eager skips? compiled skips?' from attack_check + profiles."""
    row = {**meta, "kind": "check", "smoke": smoke, "name": "attack weight-grad work: eager skips? "
           "compiled skips?", **{k: v for k, v in check.items() if k != "eager_flops_by_op"}}
    if "error" in check:
        error = check["error"]
        row["answer"] = error if error.startswith("skipped") else f"check failed: {error}"
        return row
    e = check["eager_flops"]
    eager = (f"eager: frozen {e['frozen'] / 1e9:.3g} GFLOP, unfrozen autograd.grad "
             f"{e['unfrozen'] / 1e9:.3g}, released backward() {e['backward'] / 1e9:.3g} "
             f"(frozen/backward = {e['frozen'] / e['backward']:.3f}); "
             f"eager autograd.grad skips weight grads even unfrozen: {e['frozen'] == e['unfrozen']}")
    parts = [eager]
    if "compiled_frozen" in check:
        (nf, wf), (nu, wu) = check["compiled_frozen"], check["compiled_unfrozen"]
        parts.append(f"compiled backward graph: frozen {wf}/{nf} conv_backward compute weight grads, "
                     f"unfrozen {wu}/{nu}; compiled skips only when frozen: {wf == 0 and wu > 0}")
    elif "compiled_error" in check:
        parts.append(f"compiled graph inspection failed: {check['compiled_error']}")
    prof = {r["variant"]: r for r in rows if r.get("kind") == "e2e" and r.get("model") == check["model"]
            and "attack_wgrad_kernels" in r and r["variant"] in ("fast", "no-input-only")}
    if prof:
        parts.append("cuda inductor attack: " + ", ".join(
            f"{v} {r['attack_wgrad_kernels']} wgrad of {r['attack_kernels']} kernels, {r['attack_ms']} ms"
            f" (b{r['batch']})" for v, r in sorted(prof.items())))
    row["answer"] = "; ".join(parts)
    return row


# ------------------------------------------------------------------------------------------- table
def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_table(rows, file=None):
    file = file or sys.stdout
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if e2e:
        r0 = e2e[0]
        print(f"device: {r0.get('device')}, torch {r0.get('torch')}, triton {r0.get('triton')}, "
              f"CUDA {r0.get('cuda')}, commit {r0.get('git_commit')}", file=file)
        print(f"ceiling: {_fmt(r0.get('ceiling_tflops'), '.1f')} TFLOP/s ({r0.get('ceiling_op')}); "
              f"regimes: {'; '.join(f'{k} = {v}' for k, v in REGIME_HELP.items())}", file=file)
    print("\n| variant | model | batch | method | regime | images/s | ×released | TFLOP/s | MFU | ops/step "
          "| host/GPU ms per step | note |", file=file)
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---|", file=file)
    for r in e2e:
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        print(f"| {r['variant']} | {r['model']} | {r['batch']} | {r['method']} | {r['regime']} | "
              f"{_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('speedup_vs_released'), '.2f')} | "
              f"{_fmt(r.get('tflops'), '.2f')} | {_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | "
              f"{_fmt(r.get('ops_per_step'), 'd')} | {_fmt(r.get('host_ms_per_step'), '.2f')}/"
              f"{_fmt(r.get('gpu_ms_per_step'), '.2f')} | {r.get('note', '')} |", file=file)
    ratios = [r for r in rows if r.get("kind") == "ratio"]
    if ratios:
        print("\nstep time ÷ AT step time (same variant, model, batch):", file=file)
        for r in ratios:
            tail = f"  target {r['target']}: {r['status']}" if r.get("target") else ""
            print(f"  {r['variant']:<17}{r['model']} b{r['batch']} {r['method_key']:<13}"
                  f"{r['time_ratio_vs_at']:.2f}{tail}", file=file)
    for r in rows:
        if r.get("kind") == "target":
            print(f"target: {r['name']}: {_fmt(r.get('value'), '.2f')} (target {r['target']}): {r['status']}",
                  file=file)
    for r in rows:
        if r.get("kind") == "check":
            print(f"check [{r['model']}]: {r['name']}: {r.get('answer')}", file=file)


# --------------------------------------------------------------------------------------------- CLI
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


def _csv(kind, choices=None):
    def parse(text):
        items = [kind(t) for t in text.split(",") if t.strip()]
        if choices is not None:
            bad = [i for i in items if i not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {', '.join(map(str, choices))}")
        return items
    return parse


def parse_args(argv=None):
    from rwp_fast.config import MODELS
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run ({SMOKE_MODEL} b{SMOKE_BATCH}, K1=2, K2=3, 1 step): checks that every "
                        "variant runs; claims no figure and never writes bench/results")
    p.add_argument("--plan", default="issue", choices=("issue", "device"),
                   help="issue: PreAct-18 b128/b512 and WRN-34-10 b128, every variant; device: the "
                        "prioritised subset of bench/device_run.sh. --models/--batch-sizes: their product")
    p.add_argument("--models", type=_csv(str, MODELS), default=None,
                   help="comma-separated, e.g. preact_resnet18,wrn-34-10")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="comma-separated, e.g. 128,512")
    p.add_argument("--variants", type=_csv(str, VARIANTS), default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--methods", type=_csv(str, tuple(METHODS)), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 5; smoke 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats; the median is reported (default 3; smoke 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, compilation included (default 2; smoke 1)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; configurations not started by then become 'skipped' rows (0 = no limit)")
    p.add_argument("--skip", type=_csv(str, ("check",)), default=[],
                   help="'check': skip the attack weight-grad check")
    p.add_argument("--json", default=None, help="write all rows to this JSON file (rewritten as rows arrive)")
    p.add_argument("--no-results", action="store_true", help="do not append to bench/results/e2e.jsonl")
    p.add_argument("--table-from", default=None, help="only print the table of an existing --json file")
    p.add_argument("--nproc", type=int, default=1,
                   help="N > 1: the fast step on N processes (torchrun, global batch split) vs 1 process, "
                        "AT and AT-RWP; bench/bench_dist.py (multi-GPU speed is unmeasured so far)")
    args = p.parse_args(argv)
    defaults = (1, 2, 1) if args.smoke else (5, 3, 2)
    for name, value in zip(("steps", "repeats", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --smoke)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.nproc > 1:
        from .bench_dist import run as run_dist
        return run_dist(args)
    if args.table_from:
        with open(args.table_from) as f:
            print_table(json.load(f))
        return []
    device = torch.device(args.device)
    if args.smoke and device.type == "cpu":
        # One intra-op thread: the smoke figures mean nothing anyway, and on a shared 2-core machine a busy
        # neighbour makes two spinning OpenMP threads 2x slower than one (28 s vs 14 s for the suite).
        torch.set_num_threads(1)
    meta = common.run_metadata(device)
    meta["command"] = "python -m bench " + " ".join(argv)
    meta["device_type"] = device.type
    meta["ceiling_tflops"], meta["ceiling_op"] = matmul_ceiling(device)
    units = build_plan(args)
    suite = Suite(args, meta, device)
    rows = suite.run(units)
    print_table(rows)
    if device.type == "cuda" and not args.smoke and not args.no_results:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "a") as f:
            for r in rows:
                f.write(json.dumps(_jsonable(r)) + "\n")
    return rows


if __name__ == "__main__":
    main()
