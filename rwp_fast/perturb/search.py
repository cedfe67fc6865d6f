"""Fast weight-perturbation search (RWP Algorithm 1 and AWP; SPEC.md §2) on the flat buffer, in place.

The reference is ``rwp_fast.reference.perturbation_search``; the tests hold the two equal in float64.
v is never stored: it is s·a, a per-segment scale s (L,) times a direction a (N,), applied to the weights
through the ``weight_perturb`` op, a fixed number of launches per probe whatever the layer count. The
state (a, s, ‖w‖², ‖a‖², the count, the BN snapshot) is allocated once and updated in place only, so a
captured phase can hold it. The probes run in train mode and leave the BatchNorm running statistics as
they found them (snapshot and restore, one ``_foreach_copy_`` per dtype each way).

The search loop itself (``search``) is host code around two phases that the step supplies: a probe's
forward (masked loss and count) and its backward with the update. Between them it reads the count, the
one host sync per probe, and stops before the backward of an empty mask: the reference's exact break.
"""

import torch

from ..attacks.pgd import frozen
from ..core import NORM_SCOPES, UPDATE_RULES, accumulate_dtype
from ..ops import OpSet


def _foreach_copy_(dst, src):
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)  # one multi-tensor launch on CUDA (per dtype, see group_by_dtype)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def group_by_dtype(tensors):
    """[(dtype, [tensors])] in first-seen order. CUDA ``_foreach_copy_`` fuses only same-dtype lists:
    a list mixing fp32 running stats with int64 ``num_batches_tracked`` falls back to one copy per
    tensor (≈190 launches per snapshot on WRN-34-10), so the BN snapshot copies each group separately."""
    groups = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.items())


class WeightPerturbation:
    """Holds the direction a, the scale s and the BN snapshot, and perturbs the flat weights in place.

    flat: FlatWeights of the model; buffers: the model's buffers (BN running stats) to protect; ops: the
    step's ``rwp_fast.ops.OpSet``; comm: a DistContext for many processes, or None.
    """

    def __init__(self, flat, buffers, gamma, k2, lsc_range, update="accumulate", scope="layer", ops=None,
                 comm=None):
        if update not in UPDATE_RULES:
            raise ValueError(f"update: expected one of {UPDATE_RULES}, got {update!r}")
        if scope not in NORM_SCOPES:
            raise ValueError(f"scope: expected one of {NORM_SCOPES}, got {scope!r}")
        self.flat, self.gamma, self.k2 = flat, gamma, k2
        self.lsc_range, self.update, self.scope = lsc_range, update, scope
        self.ops = ops if ops is not None else OpSet(flat.w.device)
        self.comm = comm if comm is not None and comm.enabled else None
        device, num_segments = flat.w.device, flat.table.num_segments
        self.a = torch.zeros_like(flat.w)
        # max(fp32, the weights' dtype): fp64 for an fp64 model, whose equivalence with the reference is then
        # limited by fp64 rounding (~1e-12), not by these scalars
        acc = accumulate_dtype(flat.w.dtype)
        self.scale = torch.zeros(num_segments, dtype=acc, device=device)
        self.w_sq = torch.zeros(num_segments, dtype=acc, device=device)
        self.a_sq = torch.zeros(num_segments, dtype=acc, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # mask count of the last probe
        self.v_norm_ratio = torch.zeros((), dtype=acc, device=device)
        self.buffers = [b for b in buffers if b.is_floating_point() or b.dtype == torch.int64]
        self.snapshot = [torch.empty_like(b) for b in self.buffers]
        self.snapshot_groups = [(dtype, [b for b in self.buffers if b.dtype == dtype],
                                 [s for b, s in zip(self.buffers, self.snapshot) if b.dtype == dtype])
                                for dtype, _ in group_by_dtype(self.buffers)]

    # ---------------------------------------------------------------- device code (inside the phases)
    def save_buffers(self):
        for _, bufs, snaps in self.snapshot_groups:
            _foreach_copy_(snaps, bufs)

    def restore_buffers(self):
        for _, bufs, snaps in self.snapshot_groups:
            _foreach_copy_(bufs, snaps)

    def begin(self):
        """Start a search: ‖w‖² of the unperturbed weights, v = 0 (s = 0, a = 0), BN snapshot."""
        self.w_sq.copy_(self.ops.segment_sq_norm(self.flat.w, self.flat.table))
        self.a.zero_()
        self.scale.zero_()
        self.a_sq.zero_()
        self.save_buffers()

    def record_count(self, count):
        """A probe forward's mask count, into the persistent count the host reads."""
        self.count.copy_(count)

    def update_from_grad(self):
        """w −= s·a;  a ← β·a + g;  s ← γ‖w‖/(‖a‖ + 1e-20);  w += s·a.

        The first probe needs no special case: s = 0 and a = 0 there, so w − 0·a = w and 0·a + g = g
        exactly, which is what the reference's fresh start gives.
        """
        flat, table, ops = self.flat, self.flat.table, self.ops
        ops.perturb_axpy_(flat.w, self.a, self.scale, table, -1)
        beta = self.scale if self.update == "paper" else None
        self.a_sq.copy_(ops.accumulate_sq_norm_(self.a, flat.g, table, beta))
        self.scale.copy_(ops.perturb_scale(self.w_sq, self.a_sq, self.gamma, self.scope))
        ops.perturb_axpy_(flat.w, self.a, self.scale, table, +1)

    def finish(self):
        """‖v‖/‖w‖ into ``v_norm_ratio``, then w ← w − v. Exact identity when no probe updated (s = a = 0).

        s·‖a‖ rather than s²·‖a‖²: a segment with a = 0 has s = γ‖w‖/1e-20, whose square can overflow."""
        self.v_norm_ratio.copy_(torch.sqrt((self.scale * self.a_sq.sqrt()).square().sum() / self.w_sq.sum()))
        self.remove()

    def remove(self):
        """w ← w − s·a."""
        self.ops.perturb_axpy_(self.flat.w, self.a, self.scale, self.flat.table, -1)

    # ----------------------------------------------------------------------------- host code
    def search(self, forward, backward, batch_size):
        """Up to K2 probes, leaving the weights at w + v; returns (steps_taken, mask_fractions) as host values.

        forward(): one probe's forward phase, which records its count (``record_count``) and returns its
        masked mean; backward(masked_mean): its backward and ``update_from_grad``, returning False to stop
        (fp16: an overflowed gradient). ``begin`` must have run (the attack phase runs it).
        """
        steps, fractions = 0, []
        with frozen(self.flat.other_params):  # the probe backward computes the flat gradient only
            for _ in range(self.k2):
                masked_mean = forward()
                if self.comm is not None:
                    self.comm.sum_(self.count)  # the global count: every process breaks at the same probe
                count = int(self.count)  # the one host sync per probe: the exact early break
                fractions.append(count / batch_size)
                if count == 0:
                    break
                if backward(masked_mean) is False:
                    break
                steps += 1
        return steps, fractions

    def v_tensors(self):
        """v as one tensor per perturbed parameter (for tests and diagnostics; allocates)."""
        flat = self.flat
        v = torch.zeros_like(flat.w)
        self.ops.perturb_axpy_(v, self.a, self.scale, flat.table, +1)
        offsets = flat.table.offsets.tolist()
        return [v[o:o + p.numel()].as_strided(p.shape, p.stride()).clone()
                for p, o in zip(flat.params, offsets)]
