"""``rwp-fast verify --steps K``: K fast training steps against K reference steps, fp32, TF32 off.

Both models start from the same weights before every step (the fast model is re-synchronised from the
reference after each comparison), so each row measures one step's divergence: the attack's sign() may flip
a pixel whose gradient is within an ulp of 0, after which two correct trajectories part; per step that
moves the weights far less than the tolerance, across K free-running steps it need not.
"""

import contextlib
import copy

import torch

from . import tolerances as T

METHODS = {"at": dict(perturb="none"), "at-awp": dict(perturb="awp", norm_scope="layer"),
           "at-rwp": dict(perturb="rwp", norm_scope="layer")}


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


def whole_step(device, steps, model_name, batch, backend, methods=tuple(METHODS), log=None):
    """Rows: one per (method, step) with the relative weight divergence ‖w_fast − w_ref‖/‖w_ref‖."""
    from ..config import RunConfig
    from ..models import build_model
    from ..ops import dispatch
    from ..reference import train_step_ref
    from ..train.fast_step import FastTrainStep
    device = torch.device(device)
    size = 8 if model_name == "small_cnn" else 32
    rows = []
    for method in methods:
        cfg = RunConfig(dataset="synthetic", model=model_name, epsilon=8.0, alpha=2.0, attack_steps=3 if
                        device.type == "cpu" else 10, k2=4 if device.type == "cpu" else 10, gamma=0.01,
                        c_min=2.2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=batch, backend=backend,
                        precision="fp32", compile=False, channels_last=False, device=device.type,
                        **METHODS[method]).validate()
        torch.manual_seed(0)
        ref = build_model(model_name, 10, 3, (0.5,) * 3, (0.25,) * 3).to(device)
        fast = build_model(model_name, 10, 3, (0.5,) * 3, (0.25,) * 3).to(device)
        fast.load_state_dict(ref.state_dict())
        opt_ref = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        opt_fast = torch.optim.SGD(fast.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        dispatch.set_backend(backend)
        try:
            step = FastTrainStep(fast, opt_fast, cfg, device)
            data = torch.Generator().manual_seed(1)
            with no_tf32():
                for k in range(steps):
                    x = torch.rand(batch, 3, size, size, generator=data).to(device)
                    y = torch.randint(0, 10, (batch,), generator=data).to(device)
                    r = train_step_ref(ref, opt_ref, x, y, cfg,
                                       generator=torch.Generator(device=device).manual_seed(100 + k))
                    f = step(fast, opt_fast, x, y, cfg, generator=torch.Generator(device=device).manual_seed(100 + k))
                    rel = _rel([p.detach() for p in fast.parameters()], [p.detach() for p in ref.parameters()])
                    bufs = _rel([b for b in fast.buffers() if b.is_floating_point()],
                                [b for b in ref.buffers() if b.is_floating_point()])
                    probes, ref_probes = _probes(f), _probes(r)
                    ok = rel <= T.STEP_RTOL and bufs <= T.STEP_RTOL and probes == ref_probes
                    rows.append(dict(method=method, step=k + 1, model=model_name, batch=batch, backend=backend,
                                     weight_rel_divergence=rel, buffer_rel_divergence=bufs, probes=probes,
                                     reference_probes=ref_probes, tolerance=T.STEP.describe(), why=T.STEP.why,
                                     status="PASS" if ok else "FAIL"))
                    if log:
                        log(f"steps {method} {k + 1}/{steps}: rel {rel:.2e}")
                    # re-synchronise: both start the next step from the reference's state
                    fast.load_state_dict(ref.state_dict())
                    # a copy: load_state_dict keeps same-device tensors, so the momenta would be shared
                    opt_fast.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
        finally:
            dispatch.set_backend(None)
    return rows
