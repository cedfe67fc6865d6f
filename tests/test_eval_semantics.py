"""The evaluation's own semantics (issue 21, SPEC.md §4): model mode, BatchNorm statistics, random start, ε,
step size, step count and loss of every attack, in the per-epoch evaluation and in ``rwp-fast eval``.

Each test watches the model from outside: a forward pre-hook records (model.training, input) of every
forward, and the BatchNorm buffers are compared before and after. Breaking a property on purpose fails
its test; the two breaks that survived the suite before (PGD-20 in train mode, PGD-20 without its
random start) were planted and each failed here (see the commit message).
"""

import pytest
import torch

from rwp_fast.config import RunConfig
from rwp_fast.eval import run_eval_suite
from rwp_fast.reference import pgd_attack_ref
from rwp_fast.reference.attacks import margin_loss
from rwp_fast.verify.tolerances import PGD_L2_ATOL

TOL = 1e-6


class Recorder:
    """(training, pixel-space input) of every forward of `model`."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(
            lambda m, args: self.calls.append((m.training, args[0].detach().clone())))

    def modes(self):
        return [training for training, _ in self.calls]

    def inputs(self):
        return [x for _, x in self.calls]


def bn_state(model):
    """Clones of the BatchNorm running statistics (running_mean, running_var, num_batches_tracked)."""
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_bn_untouched(before, model):
    after = bn_state(model)
    assert before and before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the evaluation changed the BatchNorm statistics {changed}"


def linf(a, b):
    return (a - b).flatten(1).abs().max(1).values


def l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


# ------------------------------------------------------------------ the per-epoch evaluation (trainer)
def make_trainer(tmp_path, steps=20, **kw):
    from rwp_fast.train import Trainer
    cfg = RunConfig(dataset="digits", model="small_cnn", eval_examples=16, eval_attack_steps=steps,
                    batch_size=32, device="cpu", backend="torch", quiet=True, out_dir=str(tmp_path / "run"),
                    **kw)
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.model.train()
    with torch.no_grad():  # BN running statistics away from their init, as after training
        trainer.model(torch.rand(32, 1, 8, 8))
    return trainer


@pytest.fixture(scope="module")
def epoch_eval(tmp_path_factory):
    """One per-epoch evaluation (PGD-20) of a digits small CNN, recorded."""
    trainer = make_trainer(tmp_path_factory.mktemp("epoch_eval"))
    before = bn_state(trainer.model)
    rec = Recorder(trainer.model)
    metrics = trainer.evaluate()
    rec.handle.remove()
    return trainer, rec, before, metrics


def test_epoch_eval_runs_in_eval_mode_and_leaves_batchnorm_alone(epoch_eval):
    trainer, rec, before, _ = epoch_eval
    assert rec.calls and not any(rec.modes()), f"forwards in train mode: {rec.modes()}"
    assert_bn_untouched(before, trainer.model)
    assert trainer.model.training            # the trainer's mode is restored for the next epoch


def test_epoch_eval_pgd_has_its_random_start_epsilon_and_steps(epoch_eval):
    trainer, rec, _, _ = epoch_eval
    cfg = trainer.cfg
    x = trainer.eval_test[0].float() / 255
    xs = rec.inputs()
    # one test batch: natural, 20 attack steps, robust; then the train-accuracy batch (natural only)
    assert len(xs) == 1 + cfg.eval_attack_steps + 1 + 1
    assert torch.equal(xs[0], x)
    start, iterates, x_adv = xs[1], xs[1:1 + cfg.eval_attack_steps], xs[1 + cfg.eval_attack_steps]
    # SPEC.md §1: δ ~ U(−ε, ε), clamped into [0, 1]; about half the zero pixels of a digit clamp back to 0
    assert (start != x).float().mean() > 0.4, "PGD-20 without its random start"
    assert linf(start, x).max() <= cfg.eps + TOL
    for a, b in zip(iterates, iterates[1:] + [x_adv]):
        assert linf(b, a).max() <= cfg.step_size + TOL           # step size α = alpha/255
    assert linf(x_adv, x).max() <= cfg.eps + TOL
    assert linf(x_adv, x).max() >= cfg.eps - TOL                 # ε is reached: it is the ε asked for
    assert linf(xs[-1], trainer.eval_train[0].float() / 255).max() == 0


@pytest.mark.parametrize("steps", [0, 3])
def test_epoch_eval_runs_the_step_count_of_the_config(tmp_path, steps):
    trainer = make_trainer(tmp_path, steps=steps, epsilon_255=4.0)
    rec = Recorder(trainer.model)
    trainer.evaluate()
    # natural + steps + (robust forward when there is an attack) + train natural
    assert len(rec.calls) == 1 + steps + (1 if steps else 0) + 1
    if steps:
        assert linf(rec.inputs()[1 + steps], rec.inputs()[0]).max() == pytest.approx(4 / 255, abs=TOL)


# ------------------------------------------------------------------ rwp-fast eval (the suite)
def bn_model(classes=4, seed=0):
    """A small CNN with BatchNorm whose running statistics are not their init."""
    from rwp_fast.models import build_model
    torch.manual_seed(seed)
    model = build_model("small_cnn", classes, 1, (0.5,), (0.25,))
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8))
    return model


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(10, 1, 8, 8, generator=g)    # the box [0, 1] never binds below
    return x, torch.randint(0, 4, (10,), generator=g)


STEPS = {"natural": 0, "fgsm": 1, "fgm": 1, "pgd20": 20, "pgd100": 100, "cw": 100}
NORM = {"fgsm": "linf", "fgm": "l2"}


@pytest.mark.parametrize("attack", list(STEPS))
def test_every_suite_attack_runs_in_eval_mode_with_its_start_epsilon_and_steps(attack, images):
    x, y = images
    norm = NORM.get(attack, "linf")
    eps, alpha = (0.05, 0.01) if norm == "linf" else (0.3, 0.05)
    model = bn_model()
    model.train()
    before = bn_state(model)
    rec = Recorder(model)
    res = run_eval_suite(model, x, y, eps, alpha, norm, [attack], batch_size=5)
    assert not any(rec.modes()) and model.training
    assert_bn_untouched(before, model)
    steps = STEPS[attack]
    per_batch = [rec.inputs()[i:i + steps + 1] for i in range(0, len(rec.calls), steps + 1)]
    assert len(per_batch) == 2 and all(len(b) == steps + 1 for b in per_batch)   # steps + the scoring pass
    for k, batch in enumerate(per_batch):
        xb, x_adv = x[5 * k:5 * k + 5], batch[-1]
        if attack == "natural":
            assert torch.equal(x_adv, xb)
            continue
        dist = linf if norm == "linf" else l2
        assert dist(x_adv, xb).max() <= eps + TOL
        assert dist(x_adv, xb).min() >= eps - 1e-5      # every example reaches the ε asked for
        if attack in ("fgsm", "fgm"):                   # one step from x itself: no random start
            assert torch.equal(batch[0], xb)
        else:                                           # SPEC.md §4: PGD and C&W start at random
            assert (batch[0] != xb).float().mean() > 0.9
            assert linf(batch[1], batch[0]).max() <= alpha + TOL
    assert 0 <= res[attack] <= 1


def test_fgsm_and_fgm_step_along_the_eval_mode_gradient(images):
    x, y = images
    model = bn_model()
    model.eval()
    x_req = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    model.train()   # the suite must switch to eval mode itself
    rec = Recorder(model)
    run_eval_suite(model, x, y, 0.05, 0.01, "linf", ["fgsm"], batch_size=10)
    assert torch.allclose(rec.inputs()[-1], x + 0.05 * grad.sign(), atol=TOL)
    rec.calls.clear()
    run_eval_suite(model, x, y, 0.3, 0.05, "l2", ["fgm"], batch_size=10)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # The same fp32 gradient (same model, batch and loss); the suite's L2 step sums ‖g‖ (64 squares) and
    # then ‖δ‖ for the projection in other orders than the norm above: ≤ 1e-6 relative on |δ| ≤ ε = 0.3 < 1,
    # plus 1 fp32 ulp of x + δ < 1 (6e-8), the L2-step error model of PGD_L2_ATOL, which applies as is.
    assert torch.allclose(rec.inputs()[-1], x + 0.3 * unit, atol=PGD_L2_ATOL, rtol=0)


def test_margin_loss_is_the_cw_margin():
    z = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [5.0, -1.0, 0.5]])
    y = torch.tensor([0, 1, 0])
    # max_{j≠y} z_j − z_y: 3 − 1, 2 − 3, 0.5 − 5
    assert torch.allclose(margin_loss(z, y), torch.tensor([2.0, -1.0, -4.5]))


def test_cw_attacks_the_margin_not_the_cross_entropy(images):
    x, y = images
    model = bn_model()
    model.train()
    rec = Recorder(model)
    run_eval_suite(model, x, y, 0.05, 0.01, "linf", ["cw"], batch_size=10, seed=3)
    cw = rec.inputs()[-1]
    model.eval()
    want = pgd_attack_ref(model, x, y, 0.05, 0.01, 100, "linf", True, "cw", torch.Generator().manual_seed(3))
    ce = pgd_attack_ref(model, x, y, 0.05, 0.01, 100, "linf", True, "ce", torch.Generator().manual_seed(3))
    assert torch.allclose(cw, want, atol=TOL)
    assert not torch.allclose(cw, ce, atol=1e-3)    # the case tells the two objectives apart


@pytest.mark.parametrize("norm, aa_norm", [("linf", "Linf"), ("l2", "L2")])
def test_autoattack_gets_the_epsilon_norm_and_version_asked_for_in_eval_mode(monkeypatch, images, norm, aa_norm):
    import rwp_fast.eval.suite as suite
    seen = {}

    class FakeAutoAttack:
        def __init__(self, model, eps, norm, version, device, seed):
            seen.update(eps=eps, norm=norm, version=version, seed=seed)
            self.model, self.stages = model, []

        def run_standard_evaluation(self, x, y, batch_size):
            self.stages.append((tuple(self.attacks_to_run), self.model.training))
            seen["stages"] = self.stages
            return x, y    # no flips: every point stays robust

    monkeypatch.setattr(suite, "require_autoattack", lambda norm="linf": FakeAutoAttack)
    x, y = images
    model = bn_model()
    model.train()
    before = bn_state(model)
    run_eval_suite(model, x, y, 0.123, 0.01, norm, ["autoattack"], batch_size=10, seed=7)
    assert (seen["eps"], seen["norm"], seen["version"], seen["seed"]) == (0.123, aa_norm, "standard", 7)
    assert [s for s, _ in seen["stages"]] == [("apgd-ce",), ("apgd-t",), ("fab-t",), ("square",)]
    assert not any(training for _, training in seen["stages"])
    assert_bn_untouched(before, model)


def test_rwp_fast_eval_runs_the_checkpoint_in_eval_mode_with_its_epsilon(tmp_path, monkeypatch, capsys):
    """The command end to end: every forward of every attack in eval mode, BN statistics as saved."""
    import rwp_fast.models as models
    from rwp_fast.cli import main
    from rwp_fast.train import load_checkpoint
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--attack-steps", "1", "--eval-attack-steps",
                 "1", "--train-examples", "64", "--eval-examples", "16", "--batch-size", "32", "--epsilon", "6",
                 "--quiet", "--device", "cpu", "--out-dir", str(run)]) == 0
    saved = {k: v for k, v in load_checkpoint(run / "last.pt")["model"].items() if "running" in k}
    built = []
    real = models.build_model

    def build_and_record(*a, **kw):
        model = real(*a, **kw)
        built.append((model, Recorder(model)))
        return model

    monkeypatch.setattr(models, "build_model", build_and_record)
    assert main(["eval", str(run / "last.pt"), "--n-examples", "12", "--attacks", "natural,fgsm,pgd20,cw",
                 "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    (model, rec), = built
    assert len(rec.calls) == 1 + 2 + 21 + 101 and not any(rec.modes())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    x = rec.inputs()[0]
    assert linf(rec.inputs()[2], x).max() == pytest.approx(6 / 255, abs=TOL)     # FGSM: the run's ε
    assert linf(rec.inputs()[3 + 20], x).max() == pytest.approx(6 / 255, abs=TOL)  # PGD-20
