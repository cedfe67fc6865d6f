"""The fast training step equals the reference step, step by step, in float64 (no compile).

Algorithmic equivalence is checked in fp64, where it does not depend on the machine: fp32 convolutions
round differently per ISA, oneDNN kernel and thread count, and training amplifies that (a BatchNorm bias
is small, so its relative error is large), so an fp32 trajectory tolerance holds only on the CPU it was
tuned on. Every accumulator of the fast path is max(fp32, the weights' dtype)
(``rwp_fast.core.accumulate_dtype``), so an fp64 model is fp64 end to end on both paths.

The Triton kernels are fp32/fp16/bf16 only; their numerics are held per op to an error model
(tests/test_lsc_loss.py, test_pgd_step.py, test_weight_perturb.py), and their wiring into the step by a
per-step fp32 check below (``test_triton_ops_in_the_fast_step_equal_the_reference_per_step``).
"""

import copy
import math

import pytest
import torch

from rwp_fast.config import FULL_RANGE, RunConfig
from rwp_fast.models import build_model
from rwp_fast.ops import dispatch
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


def run_pair(cfg, steps=5, mutate=None, resync=False, in_ch=1, dtype=DTYPE, ref_cfg=None, before_fast=None):
    """Run `steps` reference and fast steps on the same batches; return their Records.

    resync: after each comparison, copy the reference's weights, buffers and momentum into the fast
    model (not the fast step's own state, so leaks between steps are still caught): each step is then
    compared from identical states (the fp32 check; in fp64 the free-running trajectories agree).
    ref_cfg: run a FastTrainStep with this config as the reference side instead of train_step_ref.
    before_fast(optimizer): called before every fast step, as a user's callback would be.
    """
    ref, fast = twin_models(in_ch, dtype)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if ref_cfg is None:
        ref_step, ref_cfg = train_step_ref, cfg
    else:
        ref_step = FastTrainStep(ref, opt_ref, ref_cfg, "cpu")
        ref_step.keep_v = True
    opt_fast = torch.optim.SGD(fast.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    step = FastTrainStep(fast, opt_fast, cfg, "cpu")
    step.keep_v = True
    records = Records(cfg.lsc_range)
    record_probe_losses(step, records)
    if mutate:
        mutate(step)
    data = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.rand(24, in_ch, 8, 8, generator=data).to(dtype)
        y = torch.randint(0, 10, (24,), generator=data)
        r = ref_step(ref, opt_ref, x, y, ref_cfg, generator=torch.Generator().manual_seed(100 + i))
        if before_fast:
            before_fast(opt_fast)
        f = step(fast, opt_fast, x, y, cfg, generator=torch.Generator().manual_seed(100 + i))
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


def assert_equivalent(records, rtol=RTOL):
    assert_clear_of_thresholds(records)
    partial_masks = 0
    for i, (r, f, sd_ref, sd_fast) in enumerate(records):
        assert torch.equal(r.x_adv, f.x_adv), f"step {i}: x_adv"
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


@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_equals_reference(case):
    cfg = make_cfg("torch", **CASES[case])
    partial = assert_equivalent(run_pair(cfg))
    if CASES[case]["perturb"] == "rwp":
        assert partial > 0  # the mask was neither empty nor full somewhere: the LSC path is exercised


def test_channels_last_fast_path_equals_reference():
    """channels-last weights (the CUDA default) make autograd return channels-last input gradients;
    the fused pgd_step must accept them, and the step must still equal the reference."""
    cfg = make_cfg("torch", **{**CASES["at-rwp-accumulate-layer"], "channels_last": True})
    # 3 channels: with 1, channels-last strides are contiguous.
    assert_equivalent(run_pair(cfg, steps=3, in_ch=3))


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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("case", ["at-rwp-accumulate-layer", "at-rwp-paper-global", "at-awp", "trades-rwp"])
def test_triton_ops_in_the_fast_step_equal_the_reference_per_step(case, channels_last, require_backend):
    require_backend("triton")
    if not dispatch.triton_interpreting() and not torch.cuda.is_available():
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    cfg = make_cfg("triton", **CASES[case], channels_last=channels_last)
    # channels-last: against the torch-backend fast step, also channels-last. Against the reference's NCHW
    # convolutions the input gradients round differently, and a sign() of one within an ulp of 0 flips
    # (2α in that pixel); with the same convolutions on both sides the attack stays bit-exact.
    ref_cfg = make_cfg("torch", **CASES[case], channels_last=True) if channels_last else None
    records = run_pair(cfg, steps=3, resync=True, in_ch=3 if channels_last else 1, dtype=torch.float32,
                       ref_cfg=ref_cfg)
    assert_clear_of_thresholds(records, FP32_THRESHOLD_MARGIN)
    for i, (r, f, sd_ref, sd_fast) in enumerate(records):
        assert torch.equal(r.x_adv, f.x_adv), f"step {i}: x_adv"
        assert f.search.steps_taken == r.search.steps_taken, f"step {i}: RWP steps before the break"
        assert [float(m) for m in f.search.mask_fractions] == [float(m) for m in r.search.mask_fractions], i
        assert float(f.loss) == pytest.approx(float(r.loss), rel=FP32_W_RTOL), f"step {i}: loss"
        assert relative_gap(f.v, r.v) <= FP32_V_RTOL, f"step {i}: v"
        floats = [k for k, t in sd_ref.items() if t.is_floating_point()]
        assert relative_gap([sd_fast[k] for k in floats], [sd_ref[k] for k in floats]) <= FP32_W_RTOL, i
        assert all(torch.equal(sd_fast[k], t) for k, t in sd_ref.items() if not t.is_floating_point())


def relative_gap(fast, ref):
    """‖fast − ref‖/‖ref‖ over a list of tensors taken as one vector (a small BN bias does not dominate)."""
    num = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(fast, ref))
    den = sum(float(b.double().norm()) ** 2 for b in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _no_bn_restore(step):
    step.perturbation.snapshot_groups = []


def _remove_v_twice(step):
    remove = step.perturbation.remove

    def twice():
        active = step.perturbation.active
        remove()
        if active:
            step.perturbation.active = True
            remove()
    step.perturbation.remove = twice


def _mean_over_the_mask_count(step):
    """The masked mean divided by ΣV instead of the batch size n (SPEC.md §2 says n)."""
    losses = step.losses

    def over_count(x, x_adv, y, lsc_range):
        masked_mean, loss, mask, count, logits = losses(x, x_adv, y, lsc_range)
        return masked_mean * loss.shape[0] / count.clamp(min=1), loss, mask, count, logits
    step.losses = over_count


def _wrong_update_rule(step):
    step.perturbation.update = "paper"  # the case is 'accumulate'


def _v_never_removed(step):
    step.perturbation.remove = lambda: None


MUTATIONS = [_no_bn_restore, _remove_v_twice, _mean_over_the_mask_count, _wrong_update_rule, _v_never_removed]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__.strip("_"))
def test_equivalence_check_catches_a_broken_fast_path(mutation):
    """Each mutation moves the weights by ≥ 1e-4 relative within 2 steps: 10^5 × the fp64 tolerance."""
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"])
    with pytest.raises(AssertionError):
        assert_equivalent(run_pair(cfg, steps=2, mutate=mutation))


@pytest.mark.parametrize("case", ["at-rwp-accumulate-layer", "at-awp"])
def test_grads_set_to_none_between_steps_still_give_the_references_v(case):
    """optimizer.zero_grad() (set_to_none=True, torch's default) between steps: the backward then makes new
    .grad tensors outside the flat gradient, which the search would never see (v = 0: RWP becomes AT)."""
    cfg = make_cfg("torch", **CASES[case])
    records = run_pair(cfg, steps=3, before_fast=lambda opt: opt.zero_grad(set_to_none=True))
    assert_equivalent(records)
    assert all(float(f.search.v_norm_ratio) > 0 for _, f, _, _ in records)


def test_flat_weights_keep_grads_as_views_and_channels_last_strides():
    _, fast = twin_models()
    fast.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    cfg = make_cfg("torch", perturb="rwp", channels_last=True)
    step = FastTrainStep(fast, opt, cfg, "cpu")
    conv = dict(fast.named_parameters())["net.conv2.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    step(fast, opt, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), cfg,
         generator=torch.Generator().manual_seed(0))
    assert step.flat.grads_are_views()
    assert conv.untyped_storage().data_ptr() == step.flat.w.untyped_storage().data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "cuda-graphs"])  # the default, and the captured mode
def test_bf16_compiled_fast_path_tracks_the_fp32_reference_on_gpu(capsys, mode):
    """30 steps of PreAct ResNet-18, AT-RWP, synthetic CIFAR-shaped data: bf16 + compile vs fp32 reference,
    each step from the reference's state (resync), so each step's bf16 error is compared, not a trajectory.
    How far the free-running bf16 trajectory drifts is a measured figure (``verify --steps``), not a gate.

    Error model, per step: bf16 keeps 8 significand bits (relative rounding 2^-9 ≈ 0.2%); through ~18
    layers the logits carry ≈1% relative error, which moves a CE of ~2 nats by ~0.02: we allow 0.05 + 5%.
    The weights after one step differ by lr·(the gradient's ~1% error): lr = 0.02 times a gradient of at
    most the weights' size is ≤ 2e-4 relative; we allow 2e-3. A wrong perturbation fails both: v never
    removed leaves γ = 1e-2 relative in the weights, and a wrong v moves the loss at w + v by O(0.1).
    The early break compares a loss with c_min, so examples near c_min can flip: we require the probe
    counts to agree in at least 80% of the steps.
    """
    device = torch.device("cuda")
    steps = 30  # per mode: both modes fit the device run's tracking part
    from rwp_fast.data import make_synthetic
    (train_x, train_y), _, _ = make_synthetic(n_train=steps * 128, n_test=8)
    kw = dict(dataset="synthetic", model="preact_resnet18", attack_steps=10, perturb="rwp", gamma=0.01,
              c_min=2.2, k2=10, lr=0.02, momentum=0.9, weight_decay=5e-4, device="cuda")
    cfg_ref = RunConfig(**kw, backend="reference").validate()
    cfg_fast = RunConfig(**kw, backend="auto", precision="bf16", compile=True, channels_last=True,
                         compile_mode=mode).validate()
    torch.manual_seed(0)
    ref = build_model("preact_resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3).to(device)
    fast = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    step = FastTrainStep(fast, opt_fast, cfg_fast, device)
    assert step.mode == mode  # no quiet fallback: the mode named is the mode measured
    gaps, weight_gaps, agree = [], [], 0
    for i in range(steps):
        x = (train_x[i * 128:(i + 1) * 128].to(device).float() / 255)
        y = train_y[i * 128:(i + 1) * 128].to(device)
        r = train_step_ref(ref, opt_ref, x, y, cfg_ref, generator=torch.Generator(device).manual_seed(i))
        f = step(fast, opt_fast, x, y, cfg_fast, generator=torch.Generator(device).manual_seed(i))
        gap = abs(float(f.loss) - r.loss)
        assert gap <= 0.05 + 0.05 * r.loss, f"step {i}: loss {float(f.loss):.4f} vs reference {r.loss:.4f}"
        weight_gap = relative_gap(list(fast.parameters()), list(ref.parameters()))
        assert weight_gap <= 2e-3, f"step {i}: weights {weight_gap:.1e} from the reference's after one step"
        gaps.append(gap)
        weight_gaps.append(weight_gap)
        agree += f.search.steps_taken == r.search.steps_taken
        fast.load_state_dict(ref.state_dict())
        opt_fast.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
    with capsys.disabled():  # the measured figures, in the device run's log
        print(f"\nbf16 {mode} per step: loss gap mean {sum(gaps) / len(gaps):.3f} max {max(gaps):.3f} nats; "
              f"weights max {max(weight_gaps):.1e} relative; probe counts agree {agree}/{steps}")
    assert agree >= 0.8 * steps, f"early-break probe counts agree in only {agree}/{steps} steps"


def test_fp16_search_stops_at_an_overflowed_probe_gradient_and_keeps_weights_finite():
    from rwp_fast.perturb import FlatWeights, WeightPerturbation
    _, model = twin_models()
    flat = FlatWeights(model)
    w0 = flat.w.clone()
    search = WeightPerturbation(flat, list(model.buffers()), 0.01, 3, (0.0, float("inf")))
    x = torch.rand(4, 1, 8, 8)

    def probe():  # an fp16-style overflow: the scaled loss's gradient is inf
        loss = model(x).float().sum() * torch.tensor(float("inf"))
        return loss, None, None, torch.tensor(4)
    info = search.search(probe, 4, grad_scale=2.0 ** 16)
    assert info.nonfinite and info.steps_taken == 0
    assert torch.equal(flat.w, w0)  # no NaN written into the weights
    search.remove()
    assert torch.equal(flat.w, w0)


def test_a_fresh_run_drops_a_stale_metrics_file(tmp_path):
    from rwp_fast.train import Trainer
    cfg = make_cfg("torch", perturb="none", epochs=1, train_examples=64, batch_size=32, eval_examples=16,
                   attack_steps=1, eval_attack_steps=1, quiet=True, out_dir=str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')  # crashed before last.pt
    Trainer(cfg, log=lambda *_: None).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "stale" not in lines[0]
