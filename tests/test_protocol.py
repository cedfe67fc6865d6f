"""The protocol that SPEC.md fixes, pinned by behaviour through the public path (issue 32).

Each test drives what a run drives (the Trainer, its step function, its batches, ``rwp-fast eval``) and
watches the number where it is used: the model's forward inputs and modes (a forward pre-hook), the
batches it is fed, the lr each step runs at, the checkpoint it writes. The expected values are SPEC.md's
literals, never the config's fields read back, so a changed default or preset fails here too.

The table from every SPEC.md item that fixes a value or a choice to the test that guards it, this
module's and the older ones', is docs/PROTOCOL.md; items without a test are marked there.

Statistical checks use the Kolmogorov–Smirnov distance D of n draws against the distribution SPEC.md
names, with the bound D < 2.7/√n: a correct draw exceeds it with probability < 1e-6 (P(D > t) ≤
2·exp(−2nt²)). Every draw is seeded, so a test is deterministic: it passes or fails the same way each run.
"""

import copy
import math
import random

import cli_helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, chisquare

import rwp_fast.data.batches as batches_module
import rwp_fast.eval.suite as suite_module
import rwp_fast.models as models_module
import rwp_fast.train.ema as ema_module
import rwp_fast.train.trainer as trainer_module
from rwp_fast.cli import main
from rwp_fast.config import PRESETS, RunConfig, preset
from rwp_fast.core import perturbed_parameters
from rwp_fast.data import load_dataset
from rwp_fast.data.subset import stratified_subset
from rwp_fast.train import Trainer, load_checkpoint

tiny_run = cli_helpers.tiny_run  # a module-scoped fixture: a 1-epoch digits run, the default threat model

EPS, ALPHA = 8 / 255, 2 / 255      # SPEC.md §1, L∞
L2_EPS, L2_ALPHA = 128 / 255, 15 / 255
TRADES_START_STD = 0.001           # SPEC.md §3: the TRADES attack starts at x + 0.001·N(0, 1)
K1 = 10                            # SPEC.md §1: PGD-10 in training
TOL = 1e-6                         # fp32 rounding of a pixel-space difference (values ≤ 1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest restores the count): on tensors this small a second thread only adds
    synchronisation, and on a shared 2-core machine it made the attacks here ~10x slower (as test_autoattack)."""
    torch.set_num_threads(1)


def quiet(*_):
    pass


def tiny(tmp_path, **kw):
    base = dict(dataset="digits", model="small_cnn", train_examples=64, batch_size=32, eval_examples=16, epochs=1,
                attack_steps=1, eval_attack_steps=1, device="cpu", backend="torch", quiet=True,
                out_dir=str(tmp_path / "run"))
    return RunConfig(**{**base, **kw}).validate()


def from_preset(name, tmp_path, **kw):
    """The preset's threat model, method and schedule on digits and a small CNN (synthetic data for RST)."""
    small = dict(dataset="synthetic" if "rst" in name else "digits", model="small_cnn", perturb="none",
                 train_examples=64, batch_size=64, eval_examples=16, epochs=1, device="cpu", quiet=True,
                 out_dir=str(tmp_path / "run"))
    return preset(name, **{**small, **kw})


class Forwards:
    """(model.training, input) of every forward of `model`."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(
            lambda m, args: self.calls.append((m.training, args[0].detach().clone())))

    @property
    def modes(self):
        return [t for t, _ in self.calls]

    @property
    def inputs(self):
        return [x for _, x in self.calls]


def ks_distance(samples, cdf):
    """Kolmogorov–Smirnov distance of 1-D samples from a cdf; with its < 1e-6 false-alarm bound."""
    s = samples.double().flatten().sort().values
    n = len(s)
    f = cdf(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item()), 2.7 / math.sqrt(n)


def uniform_cdf(lo, hi):
    return lambda s: ((s - lo) / (hi - lo)).clamp(0, 1)


def check_chain(inputs, x, eps, alpha, norm, start, steps, interior=None):
    """The iterates x_0 … x_steps of one attack on x: its start, its step size, its radius and its count.

    start: 'uniform' (δ₀ ~ U(−ε, ε) per pixel; L2: norm r·ε per example, r ~ U(0, 1)), 'none' (x₀ = x) or
    'trades' (δ₀ ~ 0.001·N(0, 1)). interior: the pixels the [0, 1] box cannot clamp (default: all).
    """
    assert len(inputs) == steps + 1, f"{len(inputs) - 1} attack steps, SPEC: {steps}"
    inside = torch.ones_like(x, dtype=torch.bool) if interior is None else interior
    delta0 = inputs[0] - x
    if start == "none":
        assert torch.equal(inputs[0], x), "a start away from x; SPEC: no random start"
    elif start == "trades":
        d, bound = ks_distance(delta0[inside] / TRADES_START_STD, torch.special.ndtr)
        assert d < bound, f"start δ₀/0.001 is not N(0, 1): KS {d:.3f} ≥ {bound:.3f} (std {delta0.std():.2e})"
    elif norm == "linf":
        d, bound = ks_distance(delta0[inside] / eps, uniform_cdf(-1, 1))
        assert d < bound, f"start δ₀/ε is not U(−1, 1): KS {d:.3f} ≥ {bound:.3f}"
    else:
        d, bound = ks_distance(delta0.flatten(1).norm(dim=1) / eps, uniform_cdf(0, 1))
        assert d < bound, f"start ‖δ₀‖/ε is not U(0, 1): KS {d:.3f} ≥ {bound:.3f}"
        # a Gaussian direction is uniform on the sphere: each squared coordinate of δ₀/‖δ₀‖ is Beta(½, (n−1)/2)
        # (the n coordinates of one example are dependent only through their sum of 1: weakly, at n = 64)
        unit = delta0.flatten(1) / delta0.flatten(1).norm(dim=1, keepdim=True)
        n = unit.shape[1]
        d, bound = ks_distance(unit.pow(2), lambda s: torch.from_numpy(beta.cdf(s.numpy(), 0.5, (n - 1) / 2)))
        assert d < bound, f"start direction is not uniform on the sphere: KS {d:.3f} ≥ {bound:.3f}"
    for k, (a, b) in enumerate(zip(inputs, inputs[1:])):
        if norm == "linf":
            move = (b - a)[inside].abs().max().item()
            assert (b - a).abs().max().item() <= alpha + TOL, f"step {k + 1} moves a pixel past α"
        else:   # an L2 step, the projection and the box clamp are each non-expansive: ‖Δ‖ ≤ α, = α unclamped
            norms = (b - a).flatten(1).norm(dim=1)
            move = norms.max().item()
            assert move <= alpha + 1e-5, f"step {k + 1} moves an example by {move:.5f} > α"
        assert move == pytest.approx(alpha, abs=1e-5), f"step {k + 1}: largest move {move:.5f}, SPEC α {alpha:.5f}"
    last = inputs[-1] - x
    radius = (last[inside].abs().max() if norm == "linf" else last.flatten(1).norm(dim=1).max()).item()
    assert radius == pytest.approx(eps, abs=1e-5), f"the attack reaches {radius:.5f}, SPEC ε {eps:.5f}"


def mid_gray(shape, seed=0):
    """Images in [0.3, 0.7]: an L∞ radius of 8/255 (and the L2 steps here) never meet the [0, 1] box."""
    return 0.3 + 0.4 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- §4: which checkpoint is best
RAW_SCRIPT = [(0.50, 0.30), (0.90, 0.20), (0.60, 0.40), (0.70, 0.35)]  # (natural, PGD-20): natural peaks at 2,
EMA_SCRIPT = [(0.90, 0.10), (0.50, 0.45), (0.60, 0.30), (0.95, 0.20)]  # robust at 3; EMA: natural 4, robust 2


def test_best_pt_holds_the_epoch_of_highest_pgd20_robust_accuracy_raw_and_ema(tmp_path, monkeypatch):
    """SPEC.md §4: "best" is the highest PGD-20 robust accuracy, not the natural one, for the raw weights
    (best.pt) and for the weight average (best_ema.pt, by its own robust accuracy); last.pt is the last."""
    # eval_attack_steps 20 costs nothing: the evaluation is scripted
    trainer = Trainer(tiny(tmp_path, epochs=4, ema_decay=0.5, lr=0.05, eval_attack_steps=20), log=quiet)
    seen = {"raw": [], "ema": []}

    def scripted(model, x, y, cfg, steps, batch_size, device, seed=0, dist=None):
        if steps == 0:   # the train-accuracy pass: no attack, not a selection criterion
            return dict(natural_acc=0.0, natural_loss=0.0, robust_acc=0.0, robust_loss=0.0)
        assert steps == 20, "the per-epoch evaluation is PGD-20"
        which = "raw" if model is trainer.model else "ema"
        natural, robust = (RAW_SCRIPT if which == "raw" else EMA_SCRIPT)[len(seen[which])]
        seen[which].append({k: v.clone() for k, v in model.state_dict().items()})
        return dict(natural_acc=natural, natural_loss=1.0, robust_acc=robust, robust_loss=1.0)

    monkeypatch.setattr(trainer_module, "evaluate_natural_and_pgd", scripted)
    monkeypatch.setattr(ema_module, "evaluate_natural_and_pgd", scripted)
    rows = trainer.fit()
    assert [r["best_epoch"] for r in rows] == [1, 1, 3, 3]
    assert [r["best_epoch_ema"] for r in rows] == [1, 2, 2, 2]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in b)

    out = tmp_path / "run"
    best, best_ema, last = (load_checkpoint(out / f) for f in ("best.pt", "best_ema.pt", "last.pt"))
    assert best["epoch"] == 3 and best["best_metric"] == 0.40
    assert same(best["model"], seen["raw"][2]) and not same(best["model"], seen["raw"][1])
    assert best_ema["epoch"] == 2 and best_ema["best_ema_metric"] == 0.45 and best_ema["selected_by"] == "ema"
    assert same(best_ema["ema"]["model"], seen["ema"][1]) and not same(best_ema["ema"]["model"], seen["ema"][3])
    assert last["epoch"] == 4 and same(last["model"], seen["raw"][3])


# --------------------------------------------------------------------------------- §3: the augmentation
MARK = (16, 10)   # a 255 pixel, with a 200 pixel to its right: the pair shows the shift and the flip


def fake_torchvision(monkeypatch, n=2048):
    """torchvision's CIFAR-10/100 and SVHN classes, serving n copies of one marked image (gray 100)."""
    import torchvision
    image = np.full((32, 32, 3), 100, np.uint8)
    image[MARK[0], MARK[1]], image[MARK[0], MARK[1] + 1] = 255, 200

    class Cifar:
        def __init__(self, root, train, download):
            self.data = np.broadcast_to(image, (n if train else 32, 32, 32, 3)).copy()
            self.targets = [i % 10 for i in range(len(self.data))]

    class Svhn:
        def __init__(self, root, split, download):
            self.data = np.ascontiguousarray(
                np.broadcast_to(image.transpose(2, 0, 1), (n if split == "train" else 32, 3, 32, 32)))
            self.labels = np.arange(len(self.data)) % 10

    for name in ("CIFAR10", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, name, Cifar)
    monkeypatch.setattr(torchvision.datasets, "SVHN", Svhn)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def shifts_and_flips(batch):
    """Per example (row shift, column shift, flipped) of the marked pixel pair, and the image's zero count."""
    bright = (batch[:, 0] == 1.0).flatten(1).float().argmax(1)
    second = (batch[:, 0] == 200 / 255).flatten(1).float().argmax(1)
    rows, cols = bright // 32, bright % 32
    flipped = second % 32 == cols - 1           # mirrored: the 200 pixel is now left of the 255 one
    dy = rows - MARK[0]
    dx = torch.where(flipped, 31 - MARK[1] - cols, cols - MARK[1])   # j = W − 1 − (c + s) when mirrored
    return dy, dx, flipped, (batch[:, 0] == 0).flatten(1).sum(1)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_augmentation_is_a_4_pixel_zero_padded_crop_and_a_fair_flip(tmp_path, monkeypatch, dataset):
    """SPEC.md §3: random crop with 4-pixel padding, and horizontal flip, measured on 2048 augmented copies
    of one marked image. Shifts: every value in [−4, 4], no other, uniform (χ² p > 1e-6); flips:
    Binomial(2048, 1/2), 5σ = 113; the padding is zeros (torchvision's RandomCrop(32, padding=4))."""
    fake_torchvision(monkeypatch)
    trainer = Trainer(tiny(tmp_path, dataset=dataset, batch_size=2048, train_examples=0), log=quiet)
    x, _ = next(trainer.batches.epoch(0))
    dy, dx, flipped, zeros = shifts_and_flips(x)
    for name, s in (("row", dy), ("column", dx)):
        assert sorted(set(s.tolist())) == list(range(-4, 5)), f"{name} shifts {sorted(set(s.tolist()))}"
        assert chisquare(torch.bincount(s + 4, minlength=9).numpy()).pvalue > 1e-6, f"{name} shifts not uniform"
    assert abs(int(flipped.sum()) - 1024) <= 113, f"{int(flipped.sum())} of 2048 flipped"
    expected_zeros = 32 * 32 - (32 - dy.abs()) * (32 - dx.abs())    # the padded rim that the crop took in
    assert torch.equal(zeros, expected_zeros), "padding is not zeros"


def test_svhn_is_not_augmented(tmp_path, monkeypatch):
    """SVHN: no augmentation, as the released code (SPEC.md is silent; see docs/PROTOCOL.md)."""
    image = fake_torchvision(monkeypatch, n=64)
    trainer = Trainer(tiny(tmp_path, dataset="svhn", train_examples=0), log=quiet)
    for x, _ in trainer.batches.epoch(0):
        assert torch.equal(x, image.expand_as(x))


# -------------------------------------------------------------------- §1, §3: the training attack
TRAINING_ATTACKS = {   # preset: (x shape, norm, ε, α, start, attack in train mode)
    "cifar10-linf-at": ((256, 1, 8, 8), "linf", EPS, ALPHA, "uniform", True),
    "svhn-linf-at": ((256, 1, 8, 8), "linf", EPS, 1 / 255, "uniform", True),
    "cifar10-l2-at": ((256, 1, 8, 8), "l2", L2_EPS, L2_ALPHA, "uniform", True),
    "cifar10-wrn34-trades": ((256, 1, 8, 8), "linf", EPS, ALPHA, "trades", False),
    "cifar10-wrn28-rst-rwp": ((8, 3, 32, 32), "linf", EPS, ALPHA, "trades", False),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(TRAINING_ATTACKS))
def test_training_attack_start_step_radius_steps_and_mode(tmp_path, name, backend):
    """SPEC.md §1/§3: AT attacks with PGD-10 from a uniform start, in train mode; TRADES and RST from
    x + 0.001·N(0, 1) in eval mode; ε and α per threat model and dataset (SVHN α = 1/255). One start, no
    restart: the K1 forwards form one chain. Both step functions, the fast one and the oracle."""
    shape, norm, eps, alpha, start, train_mode = TRAINING_ATTACKS[name]
    trainer = Trainer(from_preset(name, tmp_path, backend=backend), log=quiet)
    x = mid_gray(shape)
    y = torch.arange(shape[0]) % 10
    rec = Forwards(trainer.model)
    result = trainer.step_fn(trainer.model, trainer.optimizer, x, y, trainer.cfg, perturb_active=False,
                             generator=torch.Generator().manual_seed(1))
    if train_mode:   # K1 attack forwards, then the training forward on x_adv
        assert rec.modes == [True] * (K1 + 1)
        chain = rec.inputs
    else:            # p_nat on x, K1 attack forwards (eval mode); then the training forward on x and x_adv
        assert rec.modes == [False] * (K1 + 1) + [True, True]
        assert torch.equal(rec.inputs[0], x) and torch.equal(rec.inputs[-2], x)
        chain = rec.inputs[1:K1 + 1] + [rec.inputs[-1]]
    assert torch.equal(chain[-1], result.x_adv)
    check_chain(chain, x, eps, alpha, norm, start, K1)


def test_per_epoch_evaluation_is_pgd20_from_a_uniform_start(tmp_path):
    """SPEC.md §4: each epoch, PGD-20 at ε = 8/255, α = 2/255, random start, eval mode, on the test images
    (the defaults of a run; tests/test_eval_semantics.py pins the mode and the BatchNorm statistics)."""
    trainer = Trainer(tiny(tmp_path, eval_attack_steps=RunConfig().eval_attack_steps, eval_examples=128), log=quiet)
    rec = Forwards(trainer.model)
    trainer.evaluate()
    x = trainer.eval_test[0].float() / 255
    assert len(rec.calls) == 1 + 20 + 1 + 1 and not any(rec.modes)   # natural, 20 steps, robust; train natural
    check_chain(rec.inputs[1:22], x, EPS, ALPHA, "linf", "uniform", 20, interior=(x >= EPS) & (x <= 1 - EPS))


# ---------------------------------------------------------------------- §4: the final evaluation suite
def test_eval_suite_attacks_have_spec_start_step_radius_and_steps(tiny_run, tmp_path, monkeypatch, capsys):
    """SPEC.md §4 through `rwp-fast eval` on a checkpoint of the default threat model: FGSM one ε step
    from x; PGD-20, PGD-100 and C&W∞ (100 steps) from a uniform start with α = 2/255; AutoAttack
    'standard', L∞, ε = 8/255. Checked on the pixels the box cannot clamp."""
    seen, built = {}, []

    class FakeAutoAttack:
        def __init__(self, model, eps, norm, version, device, seed):
            seen.update(eps=eps, norm=norm, version=version)

        def run_standard_evaluation(self, x, y, batch_size):
            seen.setdefault("stages", []).append(tuple(self.attacks_to_run))
            return x, y

    real_build = models_module.build_model

    def build_and_record(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append((model, Forwards(model)))
        return model

    monkeypatch.setattr(models_module, "build_model", build_and_record)
    monkeypatch.setattr(suite_module, "require_autoattack", lambda norm="linf": FakeAutoAttack)
    assert main(["eval", str(tiny_run / "last.pt"), "--n-examples", "64", "--attacks",
                 "fgsm,pgd20,pgd100,cw,autoattack", "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    (model, rec), = built
    xs = rec.inputs
    data = load_dataset(RunConfig(dataset="digits"))
    x = data.test_x[stratified_subset(data.test_y, 64)].float() / 255   # the images `eval` takes
    inside = (x >= EPS) & (x <= 1 - EPS)
    at = 0
    for attack, steps, start, alpha in (("fgsm", 1, "none", EPS), ("pgd20", 20, "uniform", ALPHA),
                                        ("pgd100", 100, "uniform", ALPHA), ("cw", 100, "uniform", ALPHA)):
        chain = xs[at:at + steps + 1]           # steps attack forwards, then the scoring forward on x_adv
        check_chain(chain, x, EPS, alpha, "linf", start, steps, interior=inside)
        at += steps + 1
    assert len(xs) == at + 2                    # AutoAttack: its clean pass and the final scoring pass
    assert (seen["eps"], seen["norm"], seen["version"]) == (EPS, "Linf", "standard")
    assert seen["stages"] == [("apgd-ce",), ("apgd-t",), ("fab-t",), ("square",)]


# -------------------------------------------------------------------------- §2: the LSC range [p, q)
def cut(losses, k):
    """A threshold between the k-th and (k+1)-th smallest loss, where their gap is widest near k (so the
    fp32 losses of either step function fall on the same side of it); returns (threshold, k used)."""
    s = losses.sort().values
    k = max(range(k - 4, k + 5), key=lambda i: (s[i] - s[i - 1]).item())
    assert (s[k] - s[k - 1]).item() > 1e-4
    return ((s[k] + s[k - 1]) / 2).item(), k


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bound", ["lower", "upper", "both", "awp"])
def test_each_lsc_bound_selects_the_probe_mask_on_its_own(tmp_path, backend, bound):
    """SPEC.md §2: Vᵢ = 1 iff p ≤ ℓᵢ < q, ℓ at the probe (train mode); RWP's [lsc_low, c_min) and AWP's
    (−∞, ∞) whatever lsc_low and c_min say. Each bound is set where it alone masks a quarter of the batch
    (p > 0 for the lower one), so ignoring it masks nothing and the first probe's mask fraction shows it."""
    kw = dict(train_examples=64, batch_size=64, perturb="awp" if bound == "awp" else "rwp", k2=1,
              backend=backend)
    x, y = mid_gray((64, 1, 8, 8)), torch.arange(64) % 10
    x_adv = mid_gray((64, 1, 8, 8), seed=1)
    trainer = Trainer(tiny(tmp_path / "losses", **kw), log=quiet)
    with torch.no_grad():   # the first probe is at w + 0, in train mode (batch statistics): these losses
        losses = F.cross_entropy(copy.deepcopy(trainer.model).train()(x_adv), y, reduction="none")
    (p, lo), (q, hi) = cut(losses, 16), cut(losses, 48)
    p, q, want = {"lower": (q, math.inf, (64 - hi) / 64), "upper": (0.0, p, lo / 64),
                  "both": (p, q, (hi - lo) / 64), "awp": (p, q, 1.0)}[bound]
    assert bound == "awp" or 0 < want < 0.9   # ignoring a bound would mask fewer examples
    trainer = Trainer(tiny(tmp_path / "run", lsc_low=p, c_min=q, **kw), log=quiet)   # same seed, same weights
    result = trainer.step_fn(trainer.model, trainer.optimizer, x, y, trainer.cfg, perturb_active=True,
                             generator=torch.Generator().manual_seed(0), x_adv=x_adv)
    assert result.search.mask_fractions[0] == pytest.approx(want), f"range [{p:.4f}, {q:.4f})"


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("method", ["at", "trades"])
def test_probes_leave_batchnorm_statistics_and_training_forwards_update_them(tmp_path, method, backend):
    """SPEC.md §1–§2: the K2 probe forwards do not change the BatchNorm running statistics; the forwards
    in train mode do: AT's K1 attack forwards (train mode) and the training forward at w + v; TRADES
    attacks in eval mode and trains on f(x) and f(x_adv). Counted by each layer's num_batches_tracked."""
    cfg = tiny(tmp_path, method=method, perturb="rwp", k2=3, c_min=math.inf, attack_steps=2, backend=backend)
    trainer = Trainer(cfg, log=quiet)
    bn = [m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [int(m.num_batches_tracked) for m in bn]
    x, y = mid_gray((32, 1, 8, 8)), torch.arange(32) % 10
    result = trainer.step_fn(trainer.model, trainer.optimizer, x, y, cfg, perturb_active=True,
                             generator=torch.Generator().manual_seed(0))
    assert result.search.mask_fractions == [1.0] * 3                   # three probes ran
    updates = {"at": 2 + 1, "trades": 2}[method]
    assert bn and [int(m.num_batches_tracked) - b for m, b in zip(bn, before)] == [updates] * len(bn)


def test_default_search_is_layerwise_with_the_released_accumulate_rule(tmp_path):
    """SPEC.md §2 defaults: norm scope 'layer' (‖v_l‖ = γ‖w_l‖ for every tensor, w before the step) and the
    update rule 'accumulate' (the released code's), told apart from 'paper' after K2 = 3 probes."""
    kw = dict(perturb="rwp", k2=3, c_min=math.inf, backend="reference", attack_steps=1)
    x, y = mid_gray((32, 1, 8, 8)), torch.arange(32) % 10

    def v_of(name, **rule):
        trainer = Trainer(tiny(tmp_path / name, **kw, **rule), log=quiet)
        w = [p.detach().clone() for _, p in perturbed_parameters(trainer.model)]
        result = trainer.step_fn(trainer.model, trainer.optimizer, x, y, trainer.cfg, perturb_active=True,
                                 generator=torch.Generator().manual_seed(0))
        return w, result.v

    w, v = v_of("default")
    assert [(a.norm() / b.norm()).item() for a, b in zip(v, w)] == pytest.approx([0.01] * len(w), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(v, v_of("accumulate", rwp_update="accumulate")[1]))
    assert not all(torch.allclose(a, b) for a, b in zip(v, v_of("paper", rwp_update="paper")[1]))


# ------------------------------------------------------------------ §2 table, §3: presets and the schedule
SPEC_HYPERPARAMETERS = {   # (dataset, method, perturb) → γ, c_min (None: no mask), K2, warm-up epochs
    ("cifar10", "at", "rwp"): (0.01, 1.7, 10, 0), ("cifar100", "at", "rwp"): (0.01, 4.0, 10, 0),
    ("svhn", "at", "rwp"): (0.01, 1.7, 10, 5), ("cifar10", "at", "awp"): (0.01, None, 1, 0),
    ("cifar100", "at", "awp"): (0.01, None, 1, 0), ("svhn", "at", "awp"): (0.01, None, 1, 5),
    ("cifar10", "trades", "rwp"): (0.005, 1.7, 10, 10), ("cifar10", "rst", "rwp"): (0.005, 1.7, 10, 10),
    ("cifar10", "trades", "awp"): (0.005, None, 1, 10), ("cifar10", "rst", "awp"): (0.005, None, 1, 10),
}


def test_every_preset_has_the_spec_threat_model_and_perturbation_hyperparameters():
    """SPEC.md §1 (ε, α, K1 per threat model; SVHN L∞ α = 1/255), §2's table (γ, c_min, K2, warm-up) and
    §3 (TRADES β = 6), for every preset, through the derived values the run uses (lsc_range, effective_k2)."""
    for name in PRESETS:
        cfg = preset(name, **({"rst_extra": "extra.npz"} if PRESETS[name].get("method") == "rst" else {}))
        linf_alpha = 1 / 255 if cfg.dataset == "svhn" else ALPHA
        want = (L2_EPS, L2_ALPHA) if cfg.norm == "l2" else (EPS, linf_alpha)
        assert (cfg.eps, cfg.step_size, cfg.attack_steps) == (*want, K1), name
        if cfg.method != "at":
            assert cfg.trades_beta == 6.0, name
        if cfg.perturb == "none":
            assert cfg.effective_k2 == 0, name
            continue
        gamma, c_min, k2, warmup = SPEC_HYPERPARAMETERS[(cfg.dataset, cfg.method, cfg.perturb)]
        assert (cfg.gamma, cfg.effective_k2, cfg.warmup_epochs) == (gamma, k2, warmup), name
        assert cfg.lsc_range == ((0.0, c_min) if c_min is not None else (-math.inf, math.inf)), name


def lrs_per_step(trainer, steps):
    """The lr of each of the next `steps` optimizer steps, from the trainer's own scheduler."""
    out = []
    for _ in range(steps):
        out.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    return out


def test_a_run_divides_the_lr_by_10_from_the_first_step_of_each_milestone_epoch(tmp_path):
    """SPEC.md §3: lr ÷10 at the milestone epochs; the lr each step of a real run trains with."""
    trainer = Trainer(tiny(tmp_path, epochs=3, lr=0.05, lr_milestones=(1, 2), eval_attack_steps=0), log=quiet)
    used, real = [], trainer.step_fn

    def recording(model, optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *args, **kwargs)

    trainer.step_fn = recording
    trainer.fit()
    assert used == pytest.approx([0.05] * 2 + [0.005] * 2 + [0.0005] * 2)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_default_optimizer_and_schedule_are_the_papers(tmp_path):
    """SPEC.md §3, AT: SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, lr ÷10 at epochs 100 and 150
    (a run of defaults: its optimizer, batches and scheduler); RST: cosine lr per iteration, Nesterov."""
    trainer = Trainer(RunConfig(dataset="digits", model="small_cnn", train_examples=256, eval_examples=16,
                                device="cpu", quiet=True, out_dir=str(tmp_path / "at")), log=quiet)
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, False)
    assert [len(y) for _, y in trainer.batches.epoch(0)] == [128, 128]
    lrs = lrs_per_step(trainer, 200 * 2)
    assert lrs == pytest.approx([0.1] * 200 + [0.01] * 100 + [0.001] * 100)
    rst = Trainer(from_preset("cifar10-wrn28-rst-rwp", tmp_path / "rst", batch_size=8, train_examples=16,
                              epochs=4), log=quiet)
    assert rst.optimizer.param_groups[0]["nesterov"] and len(rst.batches) == 4   # 16 labeled / 4 per batch
    want = [0.1 * 0.5 * (1 + math.cos(math.pi * it / 16)) for it in range(16)]
    assert lrs_per_step(rst, 16) == pytest.approx(want)


# -------------------------------------------------------------------------- §3: extra data per batch
def extra_file(tmp_path, n=40, value=None):
    """An extra-data .npz of n 8×8 grey images: all `value` (a value no digit pixel takes), or random."""
    rng = np.random.RandomState(0)
    images = np.full((n, 8, 8, 1), value, np.uint8) if value is not None else \
        rng.randint(0, 256, (n, 8, 8, 1)).astype(np.uint8)
    path = tmp_path / "extra.npz"
    np.savez(path, images=images, labels=np.arange(n) % 10)
    return str(path)


@pytest.mark.parametrize("fraction, batch, n_extra", [
    (0.5, 5, 3), (0.1, 25, 3),      # 2.5 → 3: half up (Python's round gives 2, to even)
    (0.3, 5, 2), (0.2, 7, 1),       # 1.5 → 2 (not floor), 1.4 → 1 (not ceil)
    (None, 6, 3), (None, 5, 3),     # RST: half of every batch, half up
])
def test_extra_data_fills_round_half_up_of_f_times_b_per_batch(tmp_path, fraction, batch, n_extra):
    """SPEC.md §3: RST batches are half labeled, half extra; --extra-fraction F generalises it to round(F·B)
    extra examples, rounded half up. Counted in the batches a run trains on (extra images are all 77, a
    value no digit pixel takes: digits are multiples of 255/16, rounded)."""
    path = extra_file(tmp_path, value=77)
    kw = dict(extra_data=path, extra_fraction=fraction) if fraction else dict(method="rst", rst_extra=path)
    trainer = Trainer(tiny(tmp_path, batch_size=batch, train_examples=60, **kw), log=quiet)
    for x, _ in trainer.batches.epoch(0):
        is_extra = (x[:, 0, 4, 4] * 255).round() == 77    # the centre survives the 1-pixel crop of digits
        assert is_extra.tolist() == [False] * (batch - n_extra) + [True] * n_extra


# ------------------------------------------------------------------------ resume: every random stream
def record_streams(trainer, log, stop_at=None):
    """Per step of `trainer`, into `log`: each random stream's draw. Stops the run after step `stop_at`
    the way SIGTERM does (mid-epoch last.pt)."""
    real, forwards = trainer.step_fn, Forwards(trainer.model)

    def step(model, optimizer, x, y, cfg, perturb_active=True, generator=None):
        forwards.calls.clear()
        result = real(model, optimizer, x, y, cfg, perturb_active=perturb_active, generator=generator)
        log["attack start"].append(forwards.inputs[0] - x)
        return result

    def after(t):
        log["global torch"].append(torch.rand(3))
        log["python random"].append(random.random())
        log["numpy"].append(np.random.rand(3))
        if t.step == stop_at:
            t.preempt.requested = True

    trainer.step_fn, trainer.after_step = step, after


def test_resume_mid_epoch_continues_every_random_stream(tmp_path, monkeypatch):
    """A run stopped mid-epoch (step 6 of 8) and resumed from last.pt draws, from step 7 on, what the
    uninterrupted run draws: the labeled order, the extra-data order, the augmentation, the attack start,
    the global torch, Python and numpy generators, and the per-epoch evaluation."""
    from collections import defaultdict
    path = extra_file(tmp_path)
    logs = {}
    current = {}
    real_augment = batches_module.augment_batch

    def augment(xb, offsets, flips, pad, pad_mode="zeros"):
        log = logs[current["run"]]
        log["labeled order"].append(xb[:12].clone())
        log["extra order"].append(xb[12:].clone())
        log["augmentation"].append(torch.cat([offsets.flatten(), flips.long()]))
        return real_augment(xb, offsets, flips, pad, pad_mode)

    monkeypatch.setattr(batches_module, "augment_batch", augment)
    kw = dict(epochs=2, train_examples=48, batch_size=16, extra_data=path, extra_fraction=0.25,
              checkpoint_every_steps=3, eval_examples=32)   # 12 labeled + 4 extra: 4 steps per epoch
    rows = {}
    for run, stop_at in (("straight", None), ("stopped", 6)):
        logs[run], current["run"] = defaultdict(list), run
        random.seed(0)   # the Trainer seeds torch's global generator, not Python's and numpy's: the two runs
        np.random.seed(0)   # start them alike here, as two processes given the same seeds would
        trainer = Trainer(tiny(tmp_path / run, **kw), log=quiet)
        record_streams(trainer, logs[run], stop_at)
        rows[run] = trainer.fit()
    assert trainer.preempted and load_checkpoint(tmp_path / "stopped" / "run" / "last.pt")["step"] == 6
    logs["resumed"], current["run"] = defaultdict(list), "resumed"
    random.seed(1)      # as a new process would have them: the resume must set them, not find them
    np.random.seed(1)
    resumed = Trainer.resume(str(tmp_path / "stopped" / "run"), log=quiet)
    record_streams(resumed, logs["resumed"])
    rows["resumed"] = resumed.fit()
    straight, again = logs["straight"], logs["resumed"]
    assert set(again) == {"labeled order", "extra order", "augmentation", "attack start", "global torch",
                          "python random", "numpy"}
    for stream, draws in again.items():
        assert len(draws) == 2 and len(straight[stream]) == 8, stream
        for a, b in zip(straight[stream][6:], draws):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{stream}: the resumed run draws otherwise"
    measured = [k for k in rows["straight"][-1] if k.startswith(("train_", "test_", "best_"))]
    assert measured and all(rows["resumed"][-1][k] == rows["straight"][-1][k] for k in measured), \
        "the epoch's metrics (its evaluation's draws included) differ after the resume"
