"""Fast weight-perturbation search (RWP Algorithm 1 and AWP) on the flat buffer, in place.

Same algorithm as ``rwp_fast.reference.perturbation_search`` (the tests hold them equal), built for
speed:

* the weights are perturbed in place through the ``weight_perturb`` op: no model copies, no
  ``load_state_dict``; v is never stored, it is s·a (per-segment scale s (L,) times direction a (N,));
* ‖w_l‖² is computed once per training step, on the unperturbed weights;
* per RWP iteration the weight update is a fixed number of launches whatever the layer count:
  w −= s_old·a;  a ← β·a + g with ‖a_l‖²;  s = γ‖w_l‖/(‖a_l‖ + 1e-20);  w += s·a;
* the probes run in train mode (batch statistics) and must not move the BatchNorm running statistics:
  all buffers are snapshotted and restored with one fused ``_foreach_copy_`` each way;
* one host synchronisation per iteration: reading the mask count for the early break.

Rounding: the weights during a probe are (w + s_old·a) − s_old·a + s_new·a rather than the
reference's fresh w + v, which differs by a few ulp of w per iteration (≈1e-7 relative in fp32).
"""

from dataclasses import dataclass, field

import torch

from ..ops import accumulate_sq_norm_, perturb_axpy_, perturb_scale, segment_sq_norm
from ..reference.perturbation_search import UPDATE_RULES
from ..reference.weight_perturb import NORM_SCOPES


def _foreach_copy_(dst, src):
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)  # one multi-tensor launch on CUDA
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class FastSearchInfo:
    """LSC diagnostics; values may be 0-d device tensors, read them at the end of the epoch."""
    steps_taken: int = 0
    mask_fractions: list = field(default_factory=list)
    v_norm_ratio: object = 0.0
    nonfinite: bool = False  # fp16: a probe gradient overflowed and the search stopped there


class WeightPerturbation:
    """Holds the direction a, the scale s and the BN snapshot; ``search`` perturbs the weights in place.

    flat: FlatWeights of the model; buffers: the model's buffers (BN running stats) to protect.
    """

    def __init__(self, flat, buffers, gamma, k2, lsc_range, update="accumulate", scope="layer", backend=None):
        if update not in UPDATE_RULES:
            raise ValueError(f"update: expected one of {UPDATE_RULES}, got {update!r}")
        if scope not in NORM_SCOPES:
            raise ValueError(f"scope: expected one of {NORM_SCOPES}, got {scope!r}")
        self.flat, self.gamma, self.k2 = flat, gamma, k2
        self.lsc_range, self.update, self.scope, self.backend = lsc_range, update, scope, backend
        self.a = torch.zeros_like(flat.w)
        self.scale = torch.zeros(flat.table.num_segments, dtype=torch.float32, device=flat.w.device)
        self.buffers = [b for b in buffers if b.is_floating_point() or b.dtype == torch.int64]
        self.snapshot = [torch.empty_like(b) for b in self.buffers]
        self.active = False  # True while the weights hold w + v

    def search(self, probe, batch_size, grad_scale=None):
        """Run up to K2 probes and leave the weights at w + v. Returns FastSearchInfo.

        probe(): forward at the current weights in train mode → (masked_mean, loss, mask, count) of the
        ``lsc_loss`` op over ``self.lsc_range``. grad_scale: fp16 loss scale (the backward runs on
        grad_scale·loss, and the flat gradient is divided by it again), or None.
        """
        flat, table, be = self.flat, self.flat.table, self.backend
        w_sq = segment_sq_norm(flat.w, table, backend=be)  # once per step, unperturbed
        self.a.zero_()
        self.scale.zero_()
        info = FastSearchInfo()
        _foreach_copy_(self.snapshot, self.buffers)
        try:
            for _ in range(self.k2):
                flat.zero_grad()
                masked_mean, _, _, count = probe()
                info.mask_fractions.append(count.float() / batch_size)
                if int(count) == 0:  # the one host sync per iteration: the exact early break
                    break
                if grad_scale is None:
                    masked_mean.backward()
                else:
                    (masked_mean * grad_scale).backward()
                    flat.g.div_(grad_scale)
                    # fp16 only: an overflowed probe gradient would make ‖a‖ = inf and v = 0·inf = NaN in
                    # the weights for good. Keep the v found so far instead (a second sync, fp16 only).
                    if not bool(torch.isfinite(flat.g).all()):
                        info.nonfinite = True
                        break
                if info.steps_taken:
                    perturb_axpy_(flat.w, self.a, self.scale, table, -1, backend=be)
                beta = self.scale if (self.update == "paper" and info.steps_taken) else None
                a_sq = accumulate_sq_norm_(self.a, flat.g, table, beta, backend=be)
                self.scale = perturb_scale(w_sq, a_sq, self.gamma, self.scope)
                perturb_axpy_(flat.w, self.a, self.scale, table, +1, backend=be)
                info.steps_taken += 1
                self.active = True
        except BaseException:
            self.remove()  # leave the weights unperturbed for a caller that recovers
            raise
        finally:
            _foreach_copy_(self.buffers, self.snapshot)
        if info.steps_taken:
            v_sq = (self.scale ** 2 * a_sq).sum()
            info.v_norm_ratio = torch.sqrt(v_sq / w_sq.sum())
        return info

    def remove(self):
        """w ← w − v after the optimizer step (no-op when the search broke before its first step)."""
        if self.active:
            perturb_axpy_(self.flat.w, self.a, self.scale, self.flat.table, -1, backend=self.backend)
            self.active = False

    def v_tensors(self):
        """v as one tensor per perturbed parameter (for tests and diagnostics; allocates)."""
        flat = self.flat
        v = torch.zeros_like(flat.w)
        if self.active:
            perturb_axpy_(v, self.a, self.scale, flat.table, +1, backend=self.backend)
        offsets = flat.table.offsets.tolist()
        return [v[o:o + p.numel()].as_strided(p.shape, p.stride()).clone()
                for p, o in zip(flat.params, offsets)]
