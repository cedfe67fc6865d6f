"""``rwp-fast verify --steps K``: K fast training steps against K reference steps, in float64, TF32 off.

The verdict is algorithmic equivalence, checked in fp64 (cuDNN and oneDNN have fp64 convolutions, and
every accumulator of the fast path follows the weights' dtype): the fast step with its torch ops against
the reference step, both fp64. The fused kernels are fp32/fp16/bf16 only; their numerics are the per-op
rows of ``verify`` above, each against an error model. fp32 (and on CUDA bf16) whole-step results are
reported beside the verdict as a measured *drift* from the fp64 reference, never a gate: an fp32 step's
distance from fp64 depends on the convolution algorithm, the ISA and the thread count, and a bf16 step's
is ~1e-2 by construction.

Both models start from the same weights before every step (every fast model is re-synchronised from the
reference after each comparison), so each row measures one step: the attack's sign() may flip a pixel
whose gradient is within an ulp of 0, after which two correct trajectories part.
"""

import contextlib
import copy

import torch

from . import tolerances as T

METHODS = {"at": dict(perturb="none"), "at-awp": dict(perturb="awp", norm_scope="layer"),
           "at-rwp": dict(perturb="rwp", norm_scope="layer")}
# fp64 (u = 1.1e-16): the two paths differ by the in-place (w + s·a) − s·a + s'·a (a few ulp of w per
# probe, K2 ≤ 10) and the summation order of the norms and losses, ≤ n·u ≈ 1e-10 for the longest reduction
# (1.2M weights of a PreAct ResNet-18 layer; √n·u ≈ 1e-13 typically). Measured on small_cnn: ~1e-15.
# 1e-9 is 10× the worst case; a planted bug (v never removed, BN stats not restored) moves w by ≥ 1e-4.
FP64_STEP_RTOL = 1e-9
STEP64 = T.close(rtol=FP64_STEP_RTOL, why="fp64 on both paths: in-place w ± s·a and reduction order only; "
                                          "planted bugs move the weights by ≥ 1e-4")


def drift_precisions(device):
    """The precisions whose whole-step drift from fp64 is measured: fp32, and bf16 autocast on CUDA."""
    return ("fp32", "bf16") if torch.device(device).type == "cuda" else ("fp32",)


@contextlib.contextmanager
def no_tf32():
    """cuDNN and cuBLAS use TF32 for fp32 convolutions/matmuls by default on Ampere/Hopper: not fp32.
    cuDNN's deterministic algorithms too: a nondeterministic backward can flip the sign of an input
    gradient within an ulp of 0 and move that pixel by 2α, so a step divergence would then not be a bug."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic) = saved


def _rel(fast, ref):
    num = sum((f.double() - r.double()).norm() ** 2 for f, r in zip(fast, ref))
    den = sum(r.double().norm() ** 2 for r in ref)
    return float((num / den).sqrt()) if den > 0 else float(num.sqrt())


def _probes(result):
    value = getattr(getattr(result, "search", None), "steps_taken", None)
    return None if value is None else int(value)


def whole_step(device, steps, model_name, batch, backend, methods=tuple(METHODS), log=None, progress=None):
    """Rows: one per (method, step): the fp64 weight divergence ‖w_fast − w_ref‖/‖w_ref‖ (the verdict) and
    each drift precision's ‖w_p − w_ref‖/‖w_ref‖ from the same state (a measured figure, no verdict), with
    ``mode_counts`` ({precision: {mode: steps so far}}, ``FastTrainStep.mode_counts``) and ``fallbacks`` (one
    line per phase that left fullgraph), so that a row says how its steps ran.

    backend: of the fused ops in the drift runs (fp32/bf16); the fp64 run uses the torch ops.
    progress(rows so far): called after every row.
    """
    from ..config import RunConfig
    from ..models import build_model
    from ..reference import train_step_ref
    from ..train.fast_step import FastTrainStep
    device = torch.device(device)
    size = 8 if model_name == "small_cnn" else 32
    rows = []

    def config(method, backend, precision):
        return RunConfig(dataset="synthetic", model=model_name, epsilon_255=8.0, alpha_255=2.0, attack_steps=3 if
                         device.type == "cpu" else 10, k2=4 if device.type == "cpu" else 10, gamma=0.01,
                         c_min=2.2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=batch, backend=backend,
                         precision=precision, compile=False, channels_last=False, device=device.type,
                         compile_mode="default",  # uncaptured: the captured mode has its own GPU tests
                         deterministic=True,  # and no cudnn.benchmark: the same algorithms on both sides
                         **METHODS[method]).validate()

    def twin(ref, cfg, dtype):
        model = build_model(model_name, 10, 3, (0.5,) * 3, (0.25,) * 3).to(device, dtype)
        model.load_state_dict(ref.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return model, opt, FastTrainStep(model, opt, cfg, device)

    for method in methods:
        cfg = config(method, "torch", "fp32")  # fp32: no autocast; the models are fp64
        torch.manual_seed(0)
        ref = build_model(model_name, 10, 3, (0.5,) * 3, (0.25,) * 3).to(device, torch.float64)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        runs = {"fp64": (cfg, *twin(ref, cfg, torch.float64))}
        for precision in drift_precisions(device):
            drift_cfg = config(method, backend, precision)
            runs[precision] = (drift_cfg, *twin(ref, drift_cfg, torch.float32))
        data = torch.Generator().manual_seed(1)
        with no_tf32():
            for k in range(steps):
                x = torch.rand(batch, 3, size, size, generator=data, dtype=torch.float64).to(device)
                y = torch.randint(0, 10, (batch,), generator=data).to(device)
                r = train_step_ref(ref, opt_ref, x, y, cfg,
                                   generator=torch.Generator(device=device).manual_seed(100 + k))
                ref_params = [p.detach() for p in ref.parameters()]
                ref_bufs = [b for b in ref.buffers() if b.is_floating_point()]
                result = {}
                for precision, (run_cfg, model, opt, step) in runs.items():
                    xp = x if precision == "fp64" else x.float()
                    f = step(model, opt, xp, y, run_cfg,
                             generator=torch.Generator(device=device).manual_seed(100 + k))
                    result[precision] = (f, _rel([p.detach() for p in model.parameters()], ref_params),
                                         _rel([b for b in model.buffers() if b.is_floating_point()], ref_bufs))
                    # re-synchronise: every model starts the next step from the reference's state
                    model.load_state_dict(ref.state_dict())  # copies (and casts) into the existing tensors
                    # a copy: load_state_dict keeps same-device tensors, so the momenta would be shared;
                    # Optimizer.load_state_dict casts the momenta to each parameter's dtype
                    opt.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
                f, rel, bufs = result["fp64"]
                probes, ref_probes = _probes(f), _probes(r)
                ok = rel <= FP64_STEP_RTOL and bufs <= FP64_STEP_RTOL and probes == ref_probes
                drift = {f"{p}_weight_drift": result[p][1] for p in drift_precisions(device)}
                # how the steps ran: None for a step object without the counts
                counts = {p: getattr(run[3], "mode_counts", None) for p, run in runs.items()}
                modes = {p: None if c is None else dict(c) for p, c in counts.items()}
                fallbacks = [f"{p}: {line}" for p, run in runs.items() for line in getattr(run[3], "fallbacks", None)
                             or []]
                rows.append(dict(method=method, step=k + 1, model=model_name, batch=batch, backend=backend,
                                 dtype="fp64", weight_rel_divergence=rel, buffer_rel_divergence=bufs,
                                 probes=probes, reference_probes=ref_probes, **drift,
                                 drift_probes={p: _probes(result[p][0]) for p in drift_precisions(device)},
                                 tolerance=STEP64.describe(), why=STEP64.why, status="PASS" if ok else "FAIL",
                                 mode_counts=modes, fallbacks=fallbacks))
                if progress is not None:
                    progress(rows)
                if log:
                    log(f"steps {method} {k + 1}/{steps}: fp64 rel {rel:.2e}; drift "
                        + ", ".join(f"{p} {v:.1e}" for p, v in drift.items()))
    return rows
