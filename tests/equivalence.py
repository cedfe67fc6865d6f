"""Shared by the equivalence tests: the cases, the config, twin models, and the step-by-step comparison of
the fast step with the reference (tests/test_fast_step.py, test_captured_phases.py).

Algorithmic equivalence is checked in fp64, where it does not depend on the machine: fp32 convolutions
round differently per ISA, oneDNN kernel and thread count, and training amplifies that, so an fp32
trajectory tolerance holds only on the CPU it was tuned on. Every accumulator of the fast path is
max(fp32, the weights' dtype) (``rwp_fast.core.accumulate_dtype``), so an fp64 model is fp64 end to end.
"""

import copy
import math

import pytest
import torch

from rwp_fast.config import FULL_RANGE, RunConfig
from rwp_fast.models import build_model
from rwp_fast.reference import train_step_ref
from rwp_fast.train.fast_step import FastTrainStep

DTYPE = torch.float64
# Error model, fp64 (u = 2^-53 ≈ 1.1e-16): the two paths run the same fp64 operations except (a) the fast
# path's in-place (w + s·a) − s·a + s'·a for a fresh w + v, a few ulp of w per probe (K2 = 4), and (b) the
# summation order of the norms and losses, ≤ n·u ≈ 3e-13 relative for the longest reduction here
# (n = 2,304 weights of conv2). Measured: ≤ 2e-15 relative over 5 steps, every case. 1e-9 leaves a margin
# of 3,000× over the worst-case bound, and every mutation the suite catches moves the weights by ≥ 1e-4.
RTOL = 1e-9
# The mask p ≤ ℓ < q and the early break are discontinuous: a loss this close to p or q could fall on
# either side under a last-bit difference. 1e-6 is 10^10 fp64 ulps of a loss of ~2.5, so a case that keeps
# every loss this far away is masked identically on both paths on any machine (asserted per case).
THRESHOLD_MARGIN = 1e-6

CASES = {
    "at-rwp-accumulate-layer": dict(method="at", perturb="rwp", rwp_update="accumulate", norm_scope="layer"),
    "at-rwp-paper-layer": dict(method="at", perturb="rwp", rwp_update="paper", norm_scope="layer"),
    "at-rwp-accumulate-global": dict(method="at", perturb="rwp", rwp_update="accumulate", norm_scope="global"),
    "at-rwp-paper-global": dict(method="at", perturb="rwp", rwp_update="paper", norm_scope="global"),
    "at-awp": dict(method="at", perturb="awp"),
    # c_min 2.46, not 2.45: at 2.45 one TRADES loss of step 2 lies within fp32 rounding of c_min.
    "trades-rwp": dict(method="trades", perturb="rwp", c_min=2.46),
}


def make_cfg(backend, **kw):
    """The test config; keyword arguments override any field, `backend` included (no duplicate-argument
    TypeError when a caller's dict already names it: the GPU tests build theirs through here too)."""
    base = dict(dataset="digits", model="small_cnn", epsilon_255=32.0, alpha_255=8.0, attack_steps=3, gamma=0.05,
                c_min=2.33, k2=4, lr=0.05, momentum=0.9, weight_decay=5e-4, backend=backend, precision="fp32",
                compile=False, channels_last=False, device="cpu")
    base.update(kw)
    return RunConfig(**base).validate()


def twin_models(in_ch=1, dtype=DTYPE):
    torch.manual_seed(0)
    ref = build_model("small_cnn", 10, in_ch, (0.3,) * in_ch, (0.37,) * in_ch).to(dtype)
    fast = build_model("small_cnn", 10, in_ch, (0.3,) * in_ch, (0.37,) * in_ch).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def close(a, b, rtol=RTOL):
    """‖a − b‖ ≤ rtol·‖b‖ (+ a floor for all-zero tensors)."""
    return (a.double() - b.double()).norm() <= rtol * b.double().norm() + 1e-30


class Records(list):
    """Per-step (reference StepResult, fast StepResult, reference state_dict, fast state_dict), plus
    every per-example loss the fast path's probes saw (``probe_losses``) and the LSC range."""

    def __init__(self, lsc_range):
        super().__init__()
        self.lsc_range = lsc_range
        self.probe_losses = []


def record_probe_losses(step, records):
    """Wrap step.losses so that every probe's (B,) losses land in records.probe_losses."""
    losses = step.losses

    def recording(x, x_adv, y, lsc_range):
        out = losses(x, x_adv, y, lsc_range)
        if lsc_range != FULL_RANGE:
            records.probe_losses.append(out[1].detach().double().clone())
        return out
    step.losses = recording


def run_pair(cfg, steps=5, mutate=None, resync=False, in_ch=1, dtype=DTYPE, ref_cfg=None, before_fast=None,
             capture=None, record=True, active=None, x_adv_of=None):
    """Run `steps` reference and fast steps on the same batches; return their Records.

    resync: after each comparison, copy the reference's weights, buffers and momentum into the fast
    model (not the fast step's own state, so leaks between steps are still caught): each step is then
    compared from identical states (the fp32 check; in fp64 the free-running trajectories agree).
    ref_cfg: run a FastTrainStep with this config as the reference side instead of train_step_ref.
    before_fast(optimizer): called before every fast step, as a user's callback would be.
    active(i): perturb_active of step i (None: always). x_adv_of(x): an x_adv to pass both steps (None: attack).
    """
    ref, fast = twin_models(in_ch, dtype)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov)
    if ref_cfg is None:
        ref_step, ref_cfg = train_step_ref, cfg
    else:
        ref_step = FastTrainStep(ref, opt_ref, ref_cfg, "cpu")
        ref_step.keep_v = True
    opt_fast = torch.optim.SGD(fast.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    step = FastTrainStep(fast, opt_fast, cfg, "cpu", capture=capture)
    step.keep_v = True
    records = Records(cfg.lsc_range)
    if record:  # not under torch.compile: appending to a list from a compiled region recompiles it each time
        record_probe_losses(step, records)
    if mutate:
        mutate(step)
    data = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.rand(24, in_ch, 8, 8, generator=data).to(dtype)
        y = torch.randint(0, 10, (24,), generator=data)
        on = True if active is None else active(i)
        x_adv = None if x_adv_of is None else x_adv_of(x)
        r = ref_step(ref, opt_ref, x, y, ref_cfg, perturb_active=on, generator=torch.Generator().manual_seed(100 + i),
                     x_adv=x_adv)
        if before_fast:
            before_fast(opt_fast)
        f = step(fast, opt_fast, x, y, cfg, perturb_active=on, generator=torch.Generator().manual_seed(100 + i),
                 x_adv=x_adv)
        records.append((r, f, {k: t.clone() for k, t in ref.state_dict().items()},
                        {k: t.clone() for k, t in fast.state_dict().items()}))
        if resync:
            fast.load_state_dict(ref.state_dict())  # copies into the flat-buffer views
            opt_fast.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # else they share buffers
    return records


def assert_clear_of_thresholds(records, margin=THRESHOLD_MARGIN):
    """No probe loss within `margin` (relative to the threshold, absolute below 1) of p or q."""
    thresholds = [c for c in records.lsc_range if math.isfinite(c)]
    for k, loss in enumerate(records.probe_losses):
        for c in thresholds:
            gap = float((loss - c).abs().min())
            assert gap > margin * max(1.0, abs(c)), (
                f"probe {k}: a loss lies {gap:.1e} from the LSC threshold {c}; move the threshold so the "
                "case does not depend on rounding")


def assert_equivalent(records, rtol=RTOL, x_adv_rtol=0.0):
    """x_adv_rtol: 0 compares x_adv bit for bit (L∞: sign steps); L2's per-example norm rounds by ~1e-16."""
    assert_clear_of_thresholds(records)
    partial_masks = 0
    for i, (r, f, sd_ref, sd_fast) in enumerate(records):
        assert torch.equal(r.x_adv, f.x_adv) if x_adv_rtol == 0 else close(f.x_adv, r.x_adv, x_adv_rtol), i
        assert float(f.loss) == pytest.approx(r.loss, rel=rtol), f"step {i}: loss"
        assert f.search.steps_taken == r.search.steps_taken, f"step {i}: RWP steps before the break"
        assert [float(m) for m in f.search.mask_fractions] == pytest.approx(r.search.mask_fractions), i
        partial_masks += sum(0 < m < 1 for m in r.search.mask_fractions)
        for k, (vr, vf) in enumerate(zip(r.v, f.v)):
            assert close(vf, vr, rtol), f"step {i}: v of tensor {k}"
        for name, t in sd_ref.items():
            if t.is_floating_point():
                assert close(sd_fast[name], t, rtol), f"step {i}: {name}"
            else:
                assert torch.equal(sd_fast[name], t), f"step {i}: {name}"
    return partial_masks


# fp32, Triton ops (the interpreter has no fp64 kernels: the kernels are fp32/fp16/bf16 only). Every step
# starts from the reference's state (resync), so this compares one step's rounding, never a trajectory.
# Error model, u = 2^-24 ≈ 6e-8: the attack is bit-exact (torch gradients from identical weights, and the
# L∞ pgd_step kernel is the reference's fp32 operation sequence), so x_adv is compared exactly. The fused
# ops differ from the reference by their op-test bounds: a few ulps elementwise, ≤ √n·u ≈ 3e-6 for a
# norm over n = 2,304 weights. v = γ‖w‖·a/‖a‖ is the normalised sum of ≤ K2 = 4 probe gradients; each probe
# runs at weights that differ by that much, and the gradient's relative change per relative change of the
# weights (its condition number here, γ = 0.05 of ‖w‖ moves the loss by ~10%) is O(10), so v's error is
# ≤ 4·10·3e-6 ≈ 1e-4 and the weights' ≤ lr·that ≈ 1e-5 (lr = 0.05 times a gradient of the weights' size).
# The tolerance is 10× those bounds; a wiring bug (a wrong segment, sign, scale or update) moves v by O(1).
FP32_V_RTOL = 1e-3
FP32_W_RTOL = 1e-4
# fp32 losses of ~2.5 carry ~2e-7 (1 ulp) per op; 1e-5 relative is ~100 ulps from p and q.
FP32_THRESHOLD_MARGIN = 1e-5


def relative_gap(fast, ref):
    """‖fast − ref‖/‖ref‖ over a list of tensors taken as one vector (a small BN bias does not dominate)."""
    num = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(fast, ref))
    den = sum(float(b.double().norm()) ** 2 for b in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
