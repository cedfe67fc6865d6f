"""The fused ops, one dispatch point each: ``cuda``, ``triton`` or ``torch`` (``dispatch.py``).

``set_backend(name)`` selects the backend for the whole process (or set ``RWP_FAST_BACKEND``); every
op also takes ``backend=`` for one call.
"""

from .dispatch import OpSet, choose_backend, requested_backend, set_backend
from .lsc_loss import lsc_loss, lsc_loss_trades
from .pgd_step import pgd_random_init, pgd_step, pgd_step_
from .weight_perturb import SegmentTable, accumulate_sq_norm_, perturb_axpy_, perturb_scale, segment_sq_norm

__all__ = [
    "OpSet", "SegmentTable", "accumulate_sq_norm_", "choose_backend", "lsc_loss", "lsc_loss_trades", "perturb_axpy_",
    "perturb_scale", "pgd_random_init", "pgd_step", "pgd_step_", "requested_backend", "segment_sq_norm",
    "set_backend",
]
