"""Fast weight-perturbation search (RWP Algorithm 1 and AWP) on the flat buffer, in place.

Same algorithm as ``rwp_fast.reference.perturbation_search`` (the tests hold them equal), built for
speed:

* the weights are perturbed in place through the ``weight_perturb`` op: no model copies, no
  ``load_state_dict``; v is never stored, it is s·a (per-segment scale s (L,) times direction a (N,));
* ‖w_l‖² is computed once per training step, on the unperturbed weights;
* per RWP iteration the weight update is a fixed number of launches whatever the layer count:
  w −= s_old·a;  a ← β·a + g with ‖a_l‖²;  s = γ‖w_l‖/(‖a_l‖ + 1e-20);  w += s·a;
* the probes run in train mode (batch statistics) and must not move the BatchNorm running statistics:
  the buffers are snapshotted and restored with one ``_foreach_copy_`` per dtype each way;
* the probe backward computes only the flat weight gradient: every other parameter (biases, BN affine)
  is frozen during the probes, so no ``.grad`` outside the flat buffer is touched.

Persistent state for CUDA graphs: a, s, ‖w‖², ‖a‖², the count of the last probe, the per-probe counts
and the BN snapshot are allocated once and only ever updated in place (``copy_``), so their addresses
never change and a captured probe can be replayed.

Two early-break schedules, both exact (the tests hold both to the reference probe by probe):

* ``sync`` (default): after each probe's forward the host reads its mask count (one sync per probe, which
  drains the GPU queue) and breaks on an empty mask before the backward;
* ``stall-free``: every probe is launched in full; the count of probe k is copied to (pinned) host memory
  without blocking and read only before probe k + 2 is launched, so the queue never drains. Probes
  launched after the first empty one must be no-ops. An empty mask does give g = 0 exactly (the masked
  mean's gradient is 0·(softmax − onehot) per row), but the *update* is not a bitwise identity:
  (w + s·a) − s·a + s·a rounds differently from w + s·a, and under the 'paper' rule a ← s·a + 0 rescales
  a and s = γ‖w‖/(‖s·a‖ + 1e-20) only approximately undoes it (at an all-zero direction both give v = 0,
  so that case is harmless). So each update is gated on the device by live = alive ∧ (count > 0), with
  alive latched: s_sub = live·s_old, β = where(live, s_old, 1), s_new = where(live, s_new, s_old),
  s_add = live·s_new. A dead probe then leaves w, a and s bitwise unchanged, and a live one computes
  exactly what the sync schedule does. steps_taken counts the live probes on the device.

Many processes (``comm``, a ``rwp_fast.train.distributed.DistContext``): each probe's mask count is
all-reduced right after its forward, on the device, and its flat gradient right after its backward
(sum, then ÷N: each process's masked mean is over its B/N rows, so the result is
(1/B)·Σ_ranks Σ_i V_i ∇ℓ_i, the global masked mean). Both schedules then read the global count, so every
process breaks at the same probe — a process whose own mask is empty keeps probing with g = 0 locally —
and v is the same everywhere. The stall-free schedule stays stall-free: the all-reduce is queued on the
device like the rest of the probe.

Rounding: the weights during a probe are (w + s_old·a) − s_old·a + s_new·a rather than the
reference's fresh w + v, which differs by a few ulp of w per iteration (≈1e-7 relative in fp32).
"""

from dataclasses import dataclass, field

import torch

from ..attacks.pgd import frozen
from ..ops import accumulate_sq_norm_, perturb_axpy_, perturb_scale, segment_sq_norm
from ..core import NORM_SCOPES, UPDATE_RULES, accumulate_dtype

BREAK_SCHEDULES = ("sync", "stall-free")


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


@dataclass
class FastSearchInfo:
    """LSC diagnostics; values may be 0-d device tensors, read them at the end of the epoch."""
    steps_taken: object = 0  # int (sync schedule) or 0-d int64 device tensor (stall-free)
    mask_fractions: list = field(default_factory=list)
    v_norm_ratio: object = 0.0
    nonfinite: bool = False  # fp16: a probe gradient overflowed and the search stopped there
    # probes whose work was launched: sync, one forward each (a backward too unless the mask was empty);
    # stall-free, whole probes, up to two past the first empty mask (their gated updates are no-ops)
    probes_launched: int = 0


class WeightPerturbation:
    """Holds the direction a, the scale s and the BN snapshot; ``search`` perturbs the weights in place.

    flat: FlatWeights of the model; buffers: the model's buffers (BN running stats) to protect;
    other_params: the model's parameters outside the flat buffer, frozen during the probes.
    """

    def __init__(self, flat, buffers, gamma, k2, lsc_range, update="accumulate", scope="layer", backend=None,
                 other_params=(), comm=None):
        if update not in UPDATE_RULES:
            raise ValueError(f"update: expected one of {UPDATE_RULES}, got {update!r}")
        if scope not in NORM_SCOPES:
            raise ValueError(f"scope: expected one of {NORM_SCOPES}, got {scope!r}")
        self.flat, self.gamma, self.k2 = flat, gamma, k2
        self.lsc_range, self.update, self.scope, self.backend = lsc_range, update, scope, backend
        self.other_params = list(other_params)
        self.comm = comm if comm is not None and comm.enabled else None
        device, num_segments = flat.w.device, flat.table.num_segments
        self.a = torch.zeros_like(flat.w)
        # max(fp32, the weights' dtype): fp32 for fp32/bf16/fp16 weights, fp64 for an fp64 model, whose
        # equivalence with the reference is then limited by fp64 rounding (~1e-12), not by these scalars
        acc = accumulate_dtype(flat.w.dtype)
        self.scale = torch.zeros(num_segments, dtype=acc, device=device)
        self.w_sq = torch.zeros(num_segments, dtype=acc, device=device)
        self.a_sq = torch.zeros(num_segments, dtype=acc, device=device)
        self.alive = torch.ones((), dtype=torch.bool, device=device)   # no empty probe yet (stall-free)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)  # live probes (stall-free)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # mask count of the last probe
        self.counts = torch.zeros(max(k2, 1), dtype=torch.int64, device=device)  # per probe, this step
        pin = device.type == "cuda"
        self.counts_host = torch.zeros(max(k2, 1), dtype=torch.int64, pin_memory=pin)
        self.count_ready = [torch.cuda.Event() for _ in range(max(k2, 1))] if pin else None
        self.buffers = [b for b in buffers if b.is_floating_point() or b.dtype == torch.int64]
        self.snapshot = [torch.empty_like(b) for b in self.buffers]
        self.snapshot_groups = [(dtype, [b for b in self.buffers if b.dtype == dtype],
                                 [s for b, s in zip(self.buffers, self.snapshot) if b.dtype == dtype])
                                for dtype, _ in group_by_dtype(self.buffers)]
        self.active = False  # True while the weights may hold w + v (remove() subtracts s·a)

    # ------------------------------------------------------------------------------- persistent state
    def persistent_tensors(self):
        """{name: tensor} of the state that must keep its address across steps (CUDA-graph safety)."""
        out = dict(a=self.a, scale=self.scale, w_sq=self.w_sq, a_sq=self.a_sq, alive=self.alive,
                   steps=self.steps, count=self.count, counts=self.counts)
        out.update({f"snapshot.{i}": s for i, s in enumerate(self.snapshot)})
        return out

    def save_buffers(self):
        for _, bufs, snaps in self.snapshot_groups:
            _foreach_copy_(snaps, bufs)

    def restore_buffers(self):
        for _, bufs, snaps in self.snapshot_groups:
            _foreach_copy_(bufs, snaps)

    def begin(self):
        """Start a search: ‖w‖² of the unperturbed weights, v = 0, BN snapshot. All in place."""
        self.w_sq.copy_(segment_sq_norm(self.flat.w, self.flat.table, backend=self.backend))
        self.a.zero_()
        self.scale.zero_()
        self.a_sq.zero_()
        self.alive.fill_(True)
        self.steps.zero_()
        self.counts.zero_()
        self.save_buffers()

    # ------------------------------------------------------------------------------------ one probe
    def probe_forward(self, probe):
        """Zero the flat gradient and run the probe forward; count → self.count. Returns masked_mean."""
        self.flat.zero_grad()
        masked_mean, _, _, count = probe()
        self.count.copy_(count)
        if self.comm is not None:
            self.comm.sum_(self.count)  # the global count: every process breaks at the same probe
        return masked_mean

    def reduce_grad(self):
        """The global masked mean's gradient: the mean over processes of their flat gradients."""
        if self.comm is not None:
            self.comm.average_(self.flat.g)

    def probe_update(self, masked_mean, gated):
        """Backward into the flat gradient, then v ← update(v, g) in place (gated: stall-free)."""
        with frozen(self.other_params):
            masked_mean.backward()
        self.reduce_grad()
        self.update_from_grad(gated)

    def probe_step(self, probe):
        """One whole stall-free probe, with no host sync: what a CUDA graph captures and replays."""
        with frozen(self.other_params):
            masked_mean = self.probe_forward(probe)
        self.probe_update(masked_mean, gated=True)

    def update_from_grad(self, gated):
        """w −= s·a;  a ← β·a + g;  s ← γ‖w‖/(‖a‖ + 1e-20);  w += s·a — gated on the device if `gated`.

        The first probe needs no special case: s = 0 and a = 0 there, so w − 0·a = w and 0·a + g = g
        exactly, which is what the reference's fresh start gives.
        """
        flat, table, be = self.flat, self.flat.table, self.backend
        if gated:
            live = self.alive & (self.count > 0)
            self.alive.copy_(live)
            self.steps.add_(live)
            s_sub = self.scale * live
        else:
            s_sub = self.scale
        perturb_axpy_(flat.w, self.a, s_sub, table, -1, backend=be)
        beta = None
        if self.update == "paper":
            beta = torch.where(live, self.scale, 1.0) if gated else self.scale
        self.a_sq.copy_(accumulate_sq_norm_(self.a, flat.g, table, beta, backend=be))
        s_new = perturb_scale(self.w_sq, self.a_sq, self.gamma, self.scope)
        self.scale.copy_(torch.where(live, s_new, self.scale) if gated else s_new)
        perturb_axpy_(flat.w, self.a, self.scale * live if gated else self.scale, table, +1, backend=be)

    # ---------------------------------------------------------------------------------------- search
    def search(self, probe, batch_size, grad_scale=None, schedule="sync", run_probe=None):
        """Run up to K2 probes and leave the weights at w + v. Returns FastSearchInfo.

        probe(): forward at the current weights in train mode → (masked_mean, loss, mask, count) of the
        ``lsc_loss`` op over ``self.lsc_range``. grad_scale: fp16 loss scale (the backward runs on
        grad_scale·loss, and the flat gradient is divided by it again), or None; sync schedule only.
        schedule: 'sync' or 'stall-free' (module docstring). run_probe: stall-free only, launches one
        whole probe (default ``probe_step(probe)``; a CUDA graph's ``replay``).
        """
        if schedule not in BREAK_SCHEDULES:
            raise ValueError(f"schedule: expected one of {BREAK_SCHEDULES}, got {schedule!r}")
        if schedule == "stall-free" and grad_scale is not None:
            raise ValueError("grad_scale: the stall-free schedule has no fp16 overflow check; use 'sync'")
        self.begin()
        try:
            if schedule == "sync":
                info = self._search_sync(probe, batch_size, grad_scale)
            else:
                info = self._search_stall_free(run_probe or (lambda: self.probe_step(probe)), batch_size)
        except BaseException:
            self.remove()  # leave the weights unperturbed for a caller that recovers
            raise
        finally:
            self.restore_buffers()
        # s·‖a‖ rather than s²·‖a‖²: a segment with a = 0 has s = γ‖w‖/1e-20, whose square can overflow
        info.v_norm_ratio = torch.sqrt((self.scale * self.a_sq.sqrt()).square().sum() / self.w_sq.sum())
        return info

    def _search_sync(self, probe, batch_size, grad_scale):
        flat, info = self.flat, FastSearchInfo()
        for _ in range(self.k2):
            with frozen(self.other_params):
                masked_mean = self.probe_forward(probe)
            info.mask_fractions.append(self.count.float() / batch_size)
            info.probes_launched += 1
            if int(self.count) == 0:  # the one host sync per iteration: the exact early break
                break
            with frozen(self.other_params):
                if grad_scale is None:
                    masked_mean.backward()
                else:
                    (masked_mean * grad_scale).backward()
            self.reduce_grad()
            if grad_scale is not None:
                flat.g.div_(grad_scale)
                # fp16 only: an overflowed probe gradient would make ‖a‖ = inf and v = 0·inf = NaN in
                # the weights for good. Keep the v found so far instead (a second sync, fp16 only).
                if not bool(torch.isfinite(flat.g).all()):
                    info.nonfinite = True
                    break
            self.update_from_grad(gated=False)
            info.steps_taken += 1
            self.active = True
        return info

    def _post_count(self, k):
        """After probe k: keep its count on the device and start its non-blocking copy to the host."""
        self.counts[k].copy_(self.count)
        self.counts_host[k].copy_(self.count, non_blocking=True)
        if self.count_ready is not None:
            self.count_ready[k].record()

    def _read_count(self, k):
        """The count of probe k, from host memory. Waits only for probe k; k + 1 is already queued."""
        if self.count_ready is not None:
            self.count_ready[k].synchronize()
        return int(self.counts_host[k])

    def _search_stall_free(self, run_probe, batch_size):
        info = FastSearchInfo()
        self.active = True
        first_empty, launched = None, 0
        for k in range(self.k2):
            if k >= 2 and self._read_count(k - 2) == 0:
                first_empty = k - 2
                break
            run_probe()
            self._post_count(k)
            launched += 1
        # The count of probe K2 − 2 decides how many mask fractions the reference reports; read it now,
        # while probe K2 − 1 is still queued. The last probe's count only changes steps_taken, which the
        # device counts.
        if first_empty is None and launched >= 2 and self._read_count(launched - 2) == 0:
            first_empty = launched - 2
        n = launched if first_empty is None else first_empty + 1
        info.mask_fractions = list((self.counts[:n].float() / batch_size).unbind())
        info.steps_taken = self.steps.clone()
        info.probes_launched = launched
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
