"""How long a step takes: timed blocks, host vs GPU time, phase replays, GPU-busy and attack profiles, the
matmul ceiling.

Launch proxy and host-boundness: ``ops/step`` is the number of aten ops one step dispatches, counted with
a ``TorchDispatchMode`` (``rwp_fast.train.graphs.count_aten_ops``) for every eager row (a CUDA build
launches roughly one kernel per aten op in eager mode; a dispatch mode sees neither inside compiled code
nor inside a graph replay). A captured row (``step.mode == 'captured'``: ``fast`` and ``no-compile`` on
CUDA) has ``replays_per_step`` instead: the replays of its four phases (``step.graphs``: attack, probe
forward, probe backward, train) during the timed steps ÷ the timed steps, counted by wrapping each phase's
``replay`` here (``graphs.CUDAGraphPhase`` keeps no count), beside ``expected_replays_per_step`` = 1 + F + B
+ 1 of the last step (F probe forwards, B probe backwards). On CUDA each row also has ``host_ms_per_step``
(wall clock until the block's last launch returned) and ``gpu_ms_per_step`` (CUDA events around the
block): host ≈ GPU time means the GPU waited for the host. Neither says how long the GPU worked, so one
more step runs under ``torch.profiler``: ``gpu_busy_ms_per_step`` is the sum of its kernels' and copies'
device time, and ``gpu_busy_fraction`` = busy / wall step time (1.0: GPU-bound; 0.1: the GPU idles 90% of
the step). ``cudagraph_skips`` counts Inductor's skipped cudagraph trees during the row: the phases are
captured by ``rwp_fast.train.graphs``, not by Inductor, so it should stay 0 (a non-zero count means some
compiled code asked Inductor for graph trees).

Timing: ``warmup`` untimed steps first (the first compiled step compiles; a captured step runs
``graphs.WARMUP_STEPS`` steps uncaptured and captures at the next, so its rows warm up one step longer),
then ``repeats`` blocks of ``steps`` steps, each block between two ``torch.cuda.synchronize()``; images/s
is the median over the blocks. Rows record whether dynamo compiled new graphs during the timed blocks
(``recompiles``).

The attack profile (``attack_ms``, its kernels) runs ``step.adversarial_examples``: the attack phase
uncaptured (compiled where the step compiles), also for a captured row.

The ceiling is measured in the same run: a bf16 8192×8192 matmul (``triton.testing.do_bench`` through
``common.time_us``); MFU = useful TFLOP/s ÷ that ceiling (``e2e_flops``). On CPU no ceiling and no MFU
are given (an fp32 512² matmul gave "MFU" above 100%).
"""

import collections
import contextlib
import statistics
import time

import torch

from rwp_fast.bench import common


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


def cudagraph_skips():
    """Inductor's skipped cudagraph trees so far in this process (None if torch does not say)."""
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


def dynamo_reset():
    """Fresh dynamo caches: a new model instance must not count against the recompile limit."""
    import torch._dynamo
    torch._dynamo.reset()


def _compiled_graphs():
    try:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]
    except Exception:  # noqa: BLE001  only a diagnostic
        return None


PHASES = ("attack", "probe_forward", "probe_backward", "train")  # the phases of a PhaseGraphs


@contextlib.contextmanager
def counting_replays(graphs):
    """{phase: replays while active} of a ``PhaseGraphs`` (None: yields None). Each phase object's ``replay``
    is shadowed by a counting wrapper (an instance attribute) and the class's method restored on exit."""
    if graphs is None:
        yield None
        return
    counts, wrapped = {}, []
    for name in PHASES:
        phase = getattr(graphs, name, None)
        if phase is None:  # AT: no probe phases
            continue
        counts[name] = 0

        def replay(*args, _name=name, _replay=phase.replay, **kwargs):
            counts[_name] += 1
            return _replay(*args, **kwargs)
        phase.replay = replay
        wrapped.append(phase)
    try:
        yield counts
    finally:
        for phase in wrapped:
            del phase.replay


def _captured(step):
    """Whether `step` has run a step captured: its phase graphs exist (``FastTrainStep.mode_counts`` when it has
    one, else ``step.graphs``)."""
    counts = getattr(step, "mode_counts", None)
    if counts is not None:
        return counts.get("captured", 0) > 0
    return getattr(step, "graphs", None) is not None


def time_steps(step, model, optimizer, cfg, batches, device, warmup, steps, repeats):
    """Run `warmup` steps, then `repeats` synchronised blocks of `steps` steps; returns a dict.

    ``replays``: {phase: replays per timed step} when the step had its phase graphs (``step.graphs``) by the
    end of the warm-up, else None. ``first_step_s``: seconds from the first call to the end of the first step
    (its compilation included, the device synchronised); ``first_captured_step_s`` the same to the end of the
    first step that ran captured (None: none did). ``mode_counts``: {mode: steps} of every step the step object
    ran (``FastTrainStep.mode_counts``; None without one), ``timed_mode_counts`` of the timed steps alone."""
    generator = torch.Generator(device=device).manual_seed(0)
    counter = iter(range(1 << 30))
    cuda = torch.device(device).type == "cuda"
    first = {"step": None, "captured": None}  # seconds from the start to the end of the first (captured) step

    def one():
        x, y = batches[next(counter) % len(batches)]
        out = step(model, optimizer, x, y, cfg, True, generator)
        if first["step"] is None or (first["captured"] is None and _captured(step)):
            common.sync(device)  # once or twice per row: the compile and the capture, not a launch, are timed
            now = time.perf_counter() - t0
            first["step"] = now if first["step"] is None else first["step"]
            if _captured(step):
                first["captured"] = now
        return out

    t0 = time.perf_counter()
    result = None
    for _ in range(warmup):
        result = one()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    graphs_before = _compiled_graphs()
    modes_before = collections.Counter(getattr(step, "mode_counts", None) or {})
    seconds, host_s, gpu_ms = [], [], []
    with counting_replays(getattr(step, "graphs", None)) as replays:
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
    counts = getattr(step, "mode_counts", None)
    return {"seconds": seconds, "warmup_s": warmup_s, "result": result, "recompiles": recompiles,
            "first_step_s": first["step"], "first_captured_step_s": first["captured"],
            "mode_counts": None if counts is None else dict(counts),
            "timed_mode_counts": None if counts is None else dict(collections.Counter(counts) - modes_before),
            "host_ms": 1e3 * statistics.median(host_s) / steps,
            "gpu_ms": statistics.median(gpu_ms) / steps if gpu_ms else None,
            "replays": None if replays is None else {k: n / (steps * repeats) for k, n in replays.items()}}

