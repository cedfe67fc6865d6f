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

import pytest
import torch

from equivalence import (CASES, FP32_THRESHOLD_MARGIN, FP32_V_RTOL, FP32_W_RTOL, assert_clear_of_thresholds,
                         assert_equivalent, make_cfg, relative_gap, run_pair, twin_models)
from rwp_fast.config import RunConfig
from rwp_fast.models import build_model
from rwp_fast.reference import train_step_ref
from rwp_fast.train.fast_step import FastTrainStep

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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("case", ["at-rwp-accumulate-layer", "at-rwp-paper-global", "at-awp", "trades-rwp"])
def test_triton_ops_in_the_fast_step_equal_the_reference_per_step(case, channels_last, require_backend):
    require_backend("triton")
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
        # the same counts: the reference divides by B in fp32 (≤ 1 ulp, 6e-8), the fast step on the host in fp64
        assert f.search.mask_fractions == pytest.approx([float(m) for m in r.search.mask_fractions], rel=1e-7), i
        assert float(f.loss) == pytest.approx(float(r.loss), rel=FP32_W_RTOL), f"step {i}: loss"
        assert relative_gap(f.v, r.v) <= FP32_V_RTOL, f"step {i}: v"
        floats = [k for k, t in sd_ref.items() if t.is_floating_point()]
        assert relative_gap([sd_fast[k] for k in floats], [sd_ref[k] for k in floats]) <= FP32_W_RTOL, i
        assert all(torch.equal(sd_fast[k], t) for k, t in sd_ref.items() if not t.is_floating_point())


def _no_bn_restore(step):
    step.perturbation.snapshot_groups = []


def _remove_v_twice(step):
    remove = step.perturbation.remove

    def twice():
        remove()
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
    # no quiet fallback: the mode named is the mode measured
    assert step.mode == {"default": "compiled", "cuda-graphs": "captured"}[mode]
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
    """fp16: a probe gradient that overflowed (inf after the loss scale) stops the search before its update,
    which would write 0·inf = NaN into the weights for good."""
    _, model = twin_models()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = make_cfg("torch", perturb="rwp", k2=3)
    step = FastTrainStep(model, opt, cfg, "cpu")
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    w0 = step.flat.w.clone()
    x = torch.rand(4, 1, 8, 8)
    step.perturbation.begin()

    def forward():  # an fp16-style overflow: the scaled loss's gradient is inf
        step.perturbation.record_count(torch.tensor(4))
        return model(x).float().sum() * torch.tensor(float("inf"))
    steps, fractions = step.perturbation.search(forward, step.probe_backward, 4)
    assert steps == 0 and fractions == [1.0]
    assert torch.equal(step.flat.w, w0)  # no NaN written into the weights
    step.perturbation.finish()
    assert torch.equal(step.flat.w, w0)


def test_a_fresh_run_drops_a_stale_metrics_file(tmp_path):
    from rwp_fast.train import Trainer
    cfg = make_cfg("torch", perturb="none", epochs=1, train_examples=64, batch_size=32, eval_examples=16,
                   attack_steps=1, eval_attack_steps=1, quiet=True, out_dir=str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')  # crashed before last.pt
    Trainer(cfg, log=lambda *_: None).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "stale" not in lines[0]


# Settings the six CASES do not cover, each against the reference in fp64 (eager; the captured bodies in
# test_captured_phases): the L2 threat model for AT and TRADES, Nesterov momentum, no momentum, warm-up
# steps without the search, and an x_adv given by the caller (no attack).
VARIANTS = {
    "l2-at-rwp": (dict(CASES["at-rwp-accumulate-layer"], norm="l2", epsilon_255=128.0, alpha_255=32.0), {}),
    "l2-trades-rwp": (dict(CASES["trades-rwp"], norm="l2", epsilon_255=128.0, alpha_255=32.0), {}),
    "nesterov": (dict(CASES["at-rwp-paper-layer"], nesterov=True), {}),
    "no-momentum": (dict(CASES["at-awp"], momentum=0.0), {}),
    "warm-up-then-search": (CASES["at-rwp-accumulate-layer"], dict(active=lambda i: i >= 2)),
    "x-adv-given": (CASES["at-rwp-paper-global"], dict(x_adv_of=lambda x: (x + 0.03 * torch.sin(7 * x)).clamp(0, 1))),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_step_equals_reference_in_other_settings(name):
    fields, kw = VARIANTS[name]
    cfg = make_cfg("torch", **fields)
    assert_equivalent(run_pair(cfg, steps=4, **kw), x_adv_rtol=1e-12 if cfg.norm == "l2" else 0.0)


def test_sgd_update_is_torchs_sgd():
    """SGDUpdate against torch.optim.SGD on the same fp64 gradients, three steps, each setting."""
    from rwp_fast.train.sgd import SGDUpdate
    for momentum, nesterov, wd in ((0.9, False, 5e-4), (0.9, True, 5e-4), (0.0, False, 1e-2), (0.5, True, 0.0)):
        params = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
        mine = [p.clone() for p in params]
        ref_opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        opt = torch.optim.SGD(mine, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        for p in mine:
            p.grad = torch.zeros_like(p)
        update = SGDUpdate(opt, mine)
        for step in range(3):
            grads = [torch.randn_like(p) for p in params]
            for p, q, g in zip(params, mine, grads):
                p.grad = g.clone()
                q.grad.copy_(g)
            ref_opt.step()
            update.load_lr()
            update.update()
            for p, q in zip(params, mine):
                torch.testing.assert_close(q, p, rtol=1e-15, atol=1e-15)
