"""Weight averaging (--ema-decay): the foreach update against a per-tensor reference, averaging w and never
w + v (with the mutation that averages w + v shown to fail), exact resume after a real SIGKILL, best_ema.pt
and `rwp-fast eval --weights ema|raw`."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import rwp_fast.eval
from rwp_fast import cli
from rwp_fast.config import ConfigError, RunConfig
from rwp_fast.models import build_model
from rwp_fast.perturb.search import WeightPerturbation
from rwp_fast.train import Trainer, load_checkpoint, save_checkpoint
from rwp_fast.train.ema import WeightEMA


def tiny_cfg(out_dir, **kw):
    base = dict(dataset="digits", model="small_cnn", epsilon_255=32.0, alpha_255=8.0, attack_steps=1,
                eval_attack_steps=1, perturb="rwp", gamma=0.01, c_min=2.5, k2=1, epochs=1, batch_size=32, lr=0.05,
                train_examples=128, eval_examples=32, out_dir=str(out_dir), quiet=True, device="cpu",
                lr_milestones=(1,), ema_decay=0.7, ema_warmup_steps=1)  # not 0.5: lerp weights d and 1 - d must differ
    base.update(kw)
    return RunConfig(**base).validate()


def reference_ema(snapshots, decay, warmup):
    """Plain per-tensor EMA in float64: copy during the warm-up steps, then a ← d·a + (1 − d)·w. fp64, so
    the comparison measures the fp32 foreach lerp's own rounding, not that of a second fp32 formula."""
    avg = None
    for step, weights in enumerate(snapshots, start=1):
        if avg is None or step <= warmup:
            avg = [w.double() for w in weights]
        else:
            avg = [decay * a + (1 - decay) * w.double() for a, w in zip(avg, weights)]
    return avg


def ema_bounds(snapshots, warmup):
    """Per tensor, the most the fp32 EMA may be off the fp64 reference. One lerp a + t·(w − a) rounds
    w − a, t·(w − a), the sum, and t = 1 − d itself once each: ≤ 4 ulps of M = max |value| over the run
    (every term is ≤ 2M, t < 1). An earlier error shrinks by d < 1 in each later lerp, so n lerps stay
    under 4·n·ε·M with ε = 2⁻²³ (twice the unit roundoff: a 2× margin). A wrong rule (d and 1 − d
    swapped, a step skipped) is off by ~|w − a| ≳ 1e-2 here, ≥ 1e3 times this bound."""
    lerps = max(len(snapshots) - max(warmup, 1), 0)
    eps = torch.finfo(torch.float32).eps
    return [max(4 * lerps * eps * max(t.abs().max().item() for t in ts), torch.finfo(torch.float32).tiny)
            for ts in zip(*snapshots)]  # tiny: an all-zero tensor has nothing to round, and no 0/0


def floating_state(model):
    return [t for _, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_foreach_update_equals_per_tensor_reference_one_op_per_step(monkeypatch, channels_last):
    model = build_model("small_cnn", 10, 3, (0.5,) * 3, (0.25,) * 3)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = WeightEMA(model, decay=0.9, warmup_steps=2)
    assert sorted(ema.names) == sorted(n for n, t in model.state_dict().items() if t.is_floating_point())  # + BN
    assert all(a.stride() == w.stride() for a, w in zip(ema.avg, ema.live))  # the foreach fast path
    calls = {"lerp": 0, "copy": 0}
    real_lerp, real_copy = torch._foreach_lerp_, torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.__setitem__("lerp", calls["lerp"] + 1),
                                                            real_lerp(*a))[1])
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a: (calls.__setitem__("copy", calls["copy"] + 1),
                                                            real_copy(*a))[1])
    snapshots = []
    for step in range(1, 8):
        with torch.no_grad():
            for t in floating_state(model):   # a stand-in for an optimizer step and BN updates
                t.add_(torch.randn_like(t) * 0.1)
        snapshots.append([t.detach().clone() for t in floating_state(model)])
        ema.update(step)
    assert calls == {"lerp": 5, "copy": 2}   # one multi-tensor op per step
    for name, got, want, bound in zip(ema.names, ema.avg, reference_ema(snapshots, 0.9, 2),
                                      ema_bounds(snapshots, 2)):
        assert (got.double() - want).abs().max().item() <= bound, name


def _train_recording(out_dir, backend="auto", mutate=False, monkeypatch=None):
    """One epoch (4 steps) of RWP with γ = 0.5 and EMA decay 0.7. Returns (trainer, snapshots of the
    floating state after each step, as the trainer sees it). mutate: the EMA update is made while the
    weights are still w + v (just before the perturbation is removed), instead of after the step."""
    cfg = tiny_cfg(out_dir, gamma=0.5, backend=backend)
    trainer = Trainer(cfg)
    snapshots, step_fn = [], trainer.step_fn

    def recording(*args, **kwargs):
        result = step_fn(*args, **kwargs)
        snapshots.append([t.detach().clone() for t in floating_state(trainer.model)])
        return result

    trainer.step_fn = recording
    if mutate:
        real_update, real_remove = WeightEMA.update, WeightPerturbation.remove

        def remove_after_averaging(self):
            real_update(trainer.ema, trainer.step + 1)   # the weights are w + v here
            return real_remove(self)

        monkeypatch.setattr(WeightPerturbation, "remove", remove_after_averaging)
        monkeypatch.setattr(WeightEMA, "update", lambda self, step: None)
    trainer.fit()
    return trainer, snapshots


def _deviation(trainer, snapshots):
    """Per tensor, |fp32 EMA − fp64 reference| as a multiple of its error bound (ema_bounds)."""
    warmup = trainer.cfg.ema_warmup_steps
    want = reference_ema(snapshots, trainer.cfg.ema_decay, warmup)
    return max((a.double() - w).abs().max().item() / b
               for a, w, b in zip(trainer.ema.avg, want, ema_bounds(snapshots, warmup)))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_averages_the_unperturbed_weights(tmp_path, backend):
    trainer, snapshots = _train_recording(tmp_path / "run", backend)
    assert len(snapshots) == 4 and trainer.step == 4
    assert _deviation(trainer, snapshots) <= 1
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert 0 <= row["test_robust_acc_ema"] <= 1 and row["best_epoch_ema"] == 1
    assert (tmp_path / "run" / "best_ema.pt").exists()


def test_averaging_w_plus_v_is_caught(tmp_path, monkeypatch):
    """The mutation that averages after the perturbation is added: the check above fails on it by far."""
    trainer, snapshots = _train_recording(tmp_path / "run", mutate=True, monkeypatch=monkeypatch)
    assert _deviation(trainer, snapshots) > 1e3  # by far: over a thousand times the rounding bound


KILLED_CHILD = """
import os, signal, sys
from rwp_fast.config import RunConfig
from rwp_fast.train import Trainer
import json
cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
real = Trainer.train_epoch
def train_epoch(self):
    if self.epoch == 1:                       # epoch 1 is checkpointed: die at the start of epoch 2
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self)
Trainer.train_epoch = train_epoch
Trainer(cfg).fit()
"""


def test_resume_after_a_kill_is_exact_and_eval_takes_weights(tmp_path, monkeypatch, capsys):
    straight = Trainer(tiny_cfg(tmp_path / "straight", epochs=2))
    straight.fit()

    killed = tiny_cfg(tmp_path / "killed", epochs=2)
    (tmp_path / "cfg.json").write_text(json.dumps(killed.to_dict()))
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path / "cfg.json")], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1
    resumed = Trainer.resume(str(tmp_path / "killed"))
    resumed.fit()
    for name, a, b in zip(straight.ema.names, straight.ema.avg, resumed.ema.avg):
        assert torch.equal(a, b), name
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("straight", "killed")]
    ema_cols = ("test_robust_acc_ema", "test_natural_acc_ema", "test_robust_loss_ema", "best_epoch_ema")
    assert [[r[c] for c in ema_cols] for r in rows[0]] == [[r[c] for c in ema_cols] for r in rows[1]]
    assert (resumed.best_ema_metric, resumed.best_ema_epoch) == (straight.best_ema_metric, straight.best_ema_epoch)

    # rwp-fast eval: best_ema.pt evaluates its EMA weights by default, --weights raw the raw ones
    seen = []
    real_suite = rwp_fast.eval.run_eval_suite

    def suite(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_suite(model, *args, **kwargs)

    monkeypatch.setattr(rwp_fast.eval, "run_eval_suite", suite)
    best_ema = str(tmp_path / "killed" / "best_ema.pt")
    state = load_checkpoint(best_ema)
    for weights, key in ((None, "ema"), ("raw", "raw"), ("ema", "ema")):
        out = str(tmp_path / f"eval_{weights}.json")
        argv = ["eval", best_ema, "--attacks", "natural", "--n-examples", "16", "--device", "cpu", "--out", out]
        assert cli.main(argv + (["--weights", weights] if weights else [])) == 0
        want = state["ema"]["model"] if key == "ema" else state["model"]
        assert all(torch.equal(seen[-1][k], want[k]) for k in want)
        assert json.load(open(out))["weights"] == key
    assert any(not torch.equal(state["ema"]["model"][k], state["model"][k]) for k in state["model"])

    del state["ema"]
    save_checkpoint(tmp_path / "no_ema.pt", state)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "no_ema.pt"), "--weights", "ema", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights: checkpoint" in err and "holds no EMA weights" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", 1.0, "ema_decay: must be a number in [0, 1)"),
    ("ema_decay", -0.1, "ema_decay: must be a number in [0, 1)"),
    ("ema_decay", float("nan"), "ema_decay: must be a number in [0, 1)"),
    ("ema_warmup_steps", -1, "ema_warmup_steps: must be an integer >= 0"),
])
def test_bad_ema_settings(field, value, message):
    with pytest.raises(ConfigError) as exc:
        RunConfig(**{field: value}).validate()
    assert message in str(exc.value)


def test_default_is_off_and_presets_unchanged():
    assert RunConfig().ema_decay == 0.0
    cfg = RunConfig(dataset="digits", device="cpu", train_examples=32, batch_size=32, eval_examples=8)
    assert Trainer(cfg).ema is None


@pytest.mark.gpu
def test_update_has_no_host_sync_on_cuda():
    model = build_model("small_cnn", 10, 3, (0.5,) * 3, (0.25,) * 3).cuda()
    ema = WeightEMA(model, decay=0.999, warmup_steps=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            ema.update(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
