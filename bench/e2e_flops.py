"""What one step computes: conv + matmul FLOPs per step, and whether the attack computes weight gradients.

``torch.utils.flop_counter.FlopCounterMode`` counts the conv and matmul
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
MFU divides ``flops_useful`` by the matmul ceiling measured in the same run (``e2e_timing.matmul_ceiling``).

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
"""

import contextlib

import torch
import torch.nn.functional as F

from rwp_fast.attacks.pgd import frozen
from rwp_fast.bench.e2e_configs import build, make_batches, make_cfg, make_step
from rwp_fast.bench.e2e_timing import dynamo_reset
from rwp_fast.ops import dispatch

COUNT_BATCH = 16  # FLOPs are counted at this batch and scaled linearly to B


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
        # eager, never captured: a dispatch mode sees no op inside a graph replay
        cfg = cfg.replace(precision="fp32", channels_last=False, backend="torch", compile_mode="default").validate()
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
    dynamo_reset()
    try:
        compiled = torch.compile(model, backend=backend)
        with frozen(list(model.parameters())) if freeze else contextlib.nullcontext():
            x_adv = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(compiled(x_adv).float(), y, reduction="sum")
            torch.autograd.grad(loss, x_adv)
    finally:
        dynamo_reset()
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

