"""The one place that chooses a backend for each fused op: ``cuda``, ``triton`` or ``torch``.

Users set one switch: ``RunConfig.backend`` (CLI ``--backend``), mirrored by the environment variable
``RWP_FAST_BACKEND``. Values: ``auto`` (default), ``cuda``, ``triton``, ``torch``.

* ``auto`` picks, per op and per device, the first backend of ``AUTO_ORDER`` that can run, falls back
  quietly, and logs the choice once per (op, device) at INFO level.
* An explicit backend that cannot be used raises: the original ImportError when the module is missing,
  or a ValueError naming the tensor device it cannot run on.

The ``torch`` backend is the reference itself (``rwp_fast.reference``), so it is always available.
Triton runs CUDA tensors, and CPU tensors only under ``TRITON_INTERPRET=1`` (that is how CI runs the
kernels). The CUDA extension ``rwp_fast._C`` runs CUDA tensors only.
"""

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("rwp_fast.ops")

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "RWP_FAST_BACKEND"
OPS = ("pgd_step", "lsc_loss", "weight_perturb")

# Per op, the order in which ``auto`` tries backends on a CUDA device. The measurements that justify
# each row belong in bench/results/ with the device and date; rows without a measurement say so.
# On CPU, ``auto`` always uses ``torch``: the Triton interpreter is a correctness tool, not a fast path.
AUTO_ORDER = {
    # op:             (order on CUDA,              evidence)
    # bench/results/2026-12-04-h200/micro.json (H200, eager, p50; the Triton ops were plain launches then,
    # before they became torch.library ops with ~9 µs more host time a call on CPU).
    "pgd_step":       (("cuda", "triton", "torch"), "L∞ b128: cuda 7.4 µs vs triton 8.6; L2 b128: 9.8 vs 8.2"),
    "lsc_loss":       (("cuda", "triton", "torch"), "CE 512×10 fwd+bwd: cuda 414 µs vs triton 954 (host-bound)"),
    "weight_perturb": (("cuda", "triton", "torch"), "PreAct-18: cuda 124 µs (78% of copy) vs triton 176 (55%); "
                                                    "WRN-34-10: 502 vs 474"),
}

_override = None  # set by set_backend(); takes precedence over the environment


def set_backend(name):
    """Select the backend for all ops for this process ('auto', 'cuda', 'triton', 'torch' or None)."""
    global _override
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    _override = name


def requested_backend():
    """The backend the user asked for: set_backend() > $RWP_FAST_BACKEND > 'auto'."""
    name = _override or os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "reference":  # the run-level choice (RunConfig.backend, the same variable): its ops are torch's
        name = "torch"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_cpu_refusal(device_type):
    """None if the triton backend can run tensors of `device_type`, else why not (a sentence). On CUDA always
    None; elsewhere only the interpreter runs them, and only where it can (``kernels._interpreter``)."""
    if device_type == "cuda":
        return None
    if not triton_interpreting():
        return f"backend 'triton' runs {device_type} tensors only under TRITON_INTERPRET=1"
    if "interpreter" not in _TRITON_CPU:  # cached in a plain dict, as _MODULES: a compiled caller traces a lookup
        try:
            _TRITON_CPU["interpreter"] = importlib.import_module("rwp_fast.kernels._interpreter").interpreter_refusal()
        except ImportError as exc:
            _TRITON_CPU["interpreter"] = f"backend 'triton' is not importable: {exc}"
    return _TRITON_CPU["interpreter"]


# Plain dicts, not functools.cache: torch.compile traces a dict lookup (a constant under a guard) but
# not a cached function, so a compiled region that calls an op after its first eager call does not break.
_MODULES = {}
_AUTO = {}
_TRITON_CPU = {}


def _load(backend, op):
    """Import the module that implements `op` for `backend`; raises the original ImportError.

    A miss imports the backend's modules for every op at once: Dynamo, tracing a user's compiled function,
    reads _MODULES as it is at its first lookup, so the entries of ops called later in that function must
    already be there (``_resolve`` runs before the first lookup)."""
    module = _MODULES.get((backend, op))
    if module is None:
        if backend not in ("triton", "cuda"):
            raise AssertionError(backend)
        for each in OPS:
            name = f"rwp_fast.kernels.{each}" if backend == "triton" else "rwp_fast.ops.cuda_ops"
            _MODULES[(backend, each)] = importlib.import_module(name)
        module = _MODULES[(backend, op)]
    return module


def backend_module(backend, op):
    """The implementing module for (backend, op), or raise ImportError. 'torch' has no module here."""
    return _load(backend, op)


def _can_run(backend, op, device_type):
    if backend == "torch":
        return True
    if backend == "cuda" and device_type != "cuda":
        return False
    if backend == "triton" and triton_cpu_refusal(device_type):
        return False
    try:
        _load(backend, op)
    except ImportError:
        return False
    return True


def _auto_choice(op, device_type):
    choice = _AUTO.get((op, device_type))
    if choice is None:
        choice = "torch"
        for backend in AUTO_ORDER[op][0] if device_type == "cuda" else ("torch",):
            if _can_run(backend, op, device_type):
                log.info("rwp_fast.ops: %s on %s uses the %s backend", op, device_type, backend)
                choice = backend
                break
        _AUTO[(op, device_type)] = choice
    return choice


def choose_backend(op, device, backend=None):
    """Backend name for running `op` on tensors of `device` (a torch.device or its type string).

    backend: an explicit choice for this call; None means requested_backend().
    """
    device_type = device if isinstance(device, str) else device.type
    return _resolve(op, device_type, backend)


# Inside a user's torch.compile'd code Dynamo runs this while tracing and keeps its answer as a constant: the
# answer depends on the installed modules and the environment, not on tensors, and its imports (importlib,
# which Dynamo refuses to trace: "function marked as skipped") happen once, before any graph runs. Eager calls
# run it as it is. The ops then reach their module through the _MODULES dict, which Dynamo traces.
@torch._dynamo.assume_constant_result
def _resolve(op, device_type, backend):
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    name = backend or requested_backend()
    if name == "auto":
        return _auto_choice(op, device_type)
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name == "torch":
        return name
    _load(name, op)  # an explicit backend that is not installed raises its own ImportError
    if name == "cuda" and device_type != "cuda":
        raise ValueError(f"backend 'cuda' runs CUDA tensors only; the inputs of {op} are on {device_type}")
    refusal = triton_cpu_refusal(device_type) if name == "triton" else None
    if refusal:
        raise ValueError(f"{refusal}; the inputs of {op} are on {device_type}")
    return name


class OpSet:
    """The fused ops with their backend chosen once, for one device: what a training step holds.

    Resolving here (imports included) keeps ``choose_backend`` and its environment read out of the hot
    path, and out of compiled regions: Dynamo traces a call of a bound function as its body.
    ``names``: {op: backend}.
    """

    def __init__(self, device, backend=None):
        # the public op modules import this one; by module path, since rwp_fast.ops.pgd_step is also a function
        pgd_step, lsc_loss, weight_perturb = (importlib.import_module(f"rwp_fast.ops.{op}") for op in OPS)
        device = torch_device(device)
        self.names = {op: choose_backend(op, device, backend) for op in OPS}
        for op in OPS:
            if self.names[op] != "torch":
                _load(self.names[op], op)
        pick = lambda fn, op: functools.partial(fn, backend=self.names[op])  # noqa: E731
        self.pgd_step_ = pick(pgd_step.pgd_step_, "pgd_step")
        self.pgd_random_init = pick(pgd_step.pgd_random_init, "pgd_step")
        self.lsc_loss = pick(lsc_loss.lsc_loss, "lsc_loss")
        self.lsc_loss_trades = pick(lsc_loss.lsc_loss_trades, "lsc_loss")
        self.segment_sq_norm = pick(weight_perturb.segment_sq_norm, "weight_perturb")
        self.accumulate_sq_norm_ = pick(weight_perturb.accumulate_sq_norm_, "weight_perturb")
        self.perturb_axpy_ = pick(weight_perturb.perturb_axpy_, "weight_perturb")
        self.perturb_scale = weight_perturb.perturb_scale

    def __repr__(self):
        return f"OpSet({self.names})"


def torch_device(device):
    import torch
    return device if isinstance(device, torch.device) else torch.device(device)
