"""The fast training step equals the reference step, step by step (fp32, no compile).

Tolerance: the two paths run the same fp32 arithmetic except for (a) the fast path's in-place
(w + s·a) − s·a + s'·a instead of a fresh w + v, a few ulp of w per RWP iteration, and (b) reduction
order in the norms and the loss. Over 5 steps that stays below 1e-6 relative here; 1e-5 leaves a
10× margin, while every mutation tried (BN stats not restored, v removed twice, mean over the
mask count, a wrong update rule) moves the weights by 1e-4 or more.
"""

import copy

import pytest
import torch

from rwp_fast.config import RunConfig
from rwp_fast.models import build_model
from rwp_fast.ops import dispatch
from rwp_fast.reference import train_step_ref
from rwp_fast.train.fast_step import FastTrainStep

RTOL = 1e-5

CASES = {
    "at-rwp-accumulate-layer": dict(method="at", perturb="rwp", rwp_update="accumulate", norm_scope="layer"),
    "at-rwp-paper-layer": dict(method="at", perturb="rwp", rwp_update="paper", norm_scope="layer"),
    "at-rwp-accumulate-global": dict(method="at", perturb="rwp", rwp_update="accumulate", norm_scope="global"),
    "at-rwp-paper-global": dict(method="at", perturb="rwp", rwp_update="paper", norm_scope="global"),
    "at-awp": dict(method="at", perturb="awp"),
    # c_min 2.46, not 2.45: at 2.45 one TRADES loss of step 2 lies within rounding of c_min, so whether it is
    # masked depended on the summation order (one OpenMP thread flipped it: v 0.8% off, every step correct).
    "trades-rwp": dict(method="trades", perturb="rwp", c_min=2.46),
}


def make_cfg(backend, **kw):
    base = dict(dataset="digits", model="small_cnn", epsilon=32.0, alpha=8.0, attack_steps=3, gamma=0.05,
                c_min=2.33, k2=4, lr=0.05, momentum=0.9, weight_decay=5e-4, backend=backend, precision="fp32",
                compile=False, channels_last=False, device="cpu")
    base.update(kw)
    return RunConfig(**base).validate()


def twin_models(in_ch=1):
    torch.manual_seed(0)
    ref = build_model("small_cnn", 10, in_ch, (0.3,) * in_ch, (0.37,) * in_ch)
    fast = build_model("small_cnn", 10, in_ch, (0.3,) * in_ch, (0.37,) * in_ch)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def close(a, b, rtol=RTOL):
    """‖a − b‖ ≤ rtol·‖b‖ (+ a floor for all-zero tensors)."""
    return (a.double() - b.double()).norm() <= rtol * b.double().norm() + 1e-12


def run_pair(cfg, steps=5, mutate=None, resync=False, in_ch=1):
    """Run `steps` reference and fast steps on the same batches; return per-step comparison records.

    resync: after each comparison, copy the reference's weights, buffers and momentum into the fast
    model (not the fast step's own state, so leaks between steps are still caught). TRADES needs it:
    its attack starts at x + 0.001·N(0, 1), where the KL gradient is nearly zero, so the sign of some
    components flips under the ulp-level weight differences allowed above, and the trajectories then
    part (by 2α in a pixel) although every step is correct.
    """
    ref, fast = twin_models(in_ch)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    step = FastTrainStep(fast, opt_fast, cfg, "cpu")
    step.keep_v = True
    if mutate:
        mutate(step)
    data = torch.Generator().manual_seed(1)
    records = []
    for i in range(steps):
        x = torch.rand(24, in_ch, 8, 8, generator=data)
        y = torch.randint(0, 10, (24,), generator=data)
        r = train_step_ref(ref, opt_ref, x, y, cfg, generator=torch.Generator().manual_seed(100 + i))
        f = step(fast, opt_fast, x, y, cfg, generator=torch.Generator().manual_seed(100 + i))
        records.append((r, f, {k: t.clone() for k, t in ref.state_dict().items()},
                        {k: t.clone() for k, t in fast.state_dict().items()}))
        if resync:
            fast.load_state_dict(ref.state_dict())  # copies into the flat-buffer views
            opt_fast.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # else they share buffers
    return records


def assert_equivalent(records):
    partial_masks = 0
    for i, (r, f, sd_ref, sd_fast) in enumerate(records):
        assert torch.equal(r.x_adv, f.x_adv), f"step {i}: x_adv"
        assert float(f.loss) == pytest.approx(r.loss, rel=RTOL), f"step {i}: loss"
        assert f.search.steps_taken == r.search.steps_taken, f"step {i}: RWP steps before the break"
        assert [float(m) for m in f.search.mask_fractions] == pytest.approx(r.search.mask_fractions), i
        partial_masks += sum(0 < m < 1 for m in r.search.mask_fractions)
        for k, (vr, vf) in enumerate(zip(r.v, f.v)):
            assert close(vf, vr), f"step {i}: v of tensor {k}"
        for name, t in sd_ref.items():
            if t.is_floating_point():
                assert close(sd_fast[name], t), f"step {i}: {name}"
            else:
                assert torch.equal(sd_fast[name], t), f"step {i}: {name}"
    return partial_masks


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_equals_reference(case, backend):
    if backend == "triton" and not dispatch.triton_interpreting():
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    cfg = make_cfg(backend, **CASES[case])
    partial = assert_equivalent(run_pair(cfg, resync=CASES[case]["method"] == "trades"))
    if CASES[case]["perturb"] == "rwp":
        assert partial > 0  # the mask was neither empty nor full somewhere: the LSC path is exercised


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_fast_path_equals_reference(backend):
    """channels-last weights (the CUDA default) make autograd return channels-last input gradients;
    the fused pgd_step must accept them, and the step must still equal the reference."""
    if backend == "triton" and not dispatch.triton_interpreting():
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    cfg = make_cfg(backend, **{**CASES["at-rwp-accumulate-layer"], "channels_last": True})
    # 3 channels: with 1, channels-last strides are contiguous. resync: NHWC convolutions round differently
    # from the reference's NCHW ones, which flips the sign of near-zero input gradients one step later.
    records = run_pair(cfg, steps=2, in_ch=3, resync=True)
    assert_equivalent(records)


@pytest.mark.parametrize("mutation", [_no_bn_restore, _remove_v_twice])
def test_equivalence_check_catches_a_broken_fast_path(mutation):
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"])
    with pytest.raises(AssertionError):
        assert_equivalent(run_pair(cfg, steps=2, mutate=mutation))


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
def test_bf16_compiled_fast_path_tracks_the_fp32_reference_on_gpu():
    """50 steps of PreAct ResNet-18, AT-RWP, synthetic CIFAR-shaped data: bf16 + compile vs fp32 reference.

    Tolerance: bf16 keeps 8 significand bits (relative rounding 2^-9 ≈ 0.2%); through ~18 layers the
    logits carry ≈1% relative error, which moves a CE of ~2 nats by ~0.02, and the two runs then take
    slightly different steps, so the trajectories drift apart slowly rather than diverge. We allow
    0.05 + 5% per step and a mean gap below 0.03 nats; a wrong perturbation (e.g. v never removed)
    shifts the loss by O(1) within a few steps. The early break compares a loss with c_min, so
    examples near c_min can flip: we require the probe counts to agree in at least 80% of the steps.
    """
    device = torch.device("cuda")
    from rwp_fast.data import make_synthetic
    (train_x, train_y), _, _ = make_synthetic(n_train=50 * 128, n_test=8)
    kw = dict(dataset="synthetic", model="preact_resnet18", attack_steps=10, perturb="rwp", gamma=0.01,
              c_min=2.2, k2=10, lr=0.02, momentum=0.9, weight_decay=5e-4, device="cuda")
    cfg_ref = RunConfig(**kw, backend="reference").validate()
    cfg_fast = RunConfig(**kw, backend="auto", precision="bf16", compile=True, channels_last=True).validate()
    torch.manual_seed(0)
    ref = build_model("preact_resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3).to(device)
    fast = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    step = FastTrainStep(fast, opt_fast, cfg_fast, device)
    gaps, agree = [], 0
    for i in range(50):
        x = (train_x[i * 128:(i + 1) * 128].to(device).float() / 255)
        y = train_y[i * 128:(i + 1) * 128].to(device)
        r = train_step_ref(ref, opt_ref, x, y, cfg_ref, generator=torch.Generator(device).manual_seed(i))
        f = step(fast, opt_fast, x, y, cfg_fast, generator=torch.Generator(device).manual_seed(i))
        gap = abs(float(f.loss) - r.loss)
        assert gap <= 0.05 + 0.05 * r.loss, f"step {i}: loss {float(f.loss):.4f} vs reference {r.loss:.4f}"
        gaps.append(gap)
        agree += f.search.steps_taken == r.search.steps_taken
    assert sum(gaps) / len(gaps) < 0.03
    assert agree >= 40, f"early-break probe counts agree in only {agree}/50 steps"


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
