"""The training program: checkpoints (atomic, weights_only), resume after a real kill, schedule, metrics."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rwp_fast.config import RunConfig
from rwp_fast.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from rwp_fast.train.trainer import lr_factor


class Evil:
    """Any class outside torch's allow-list: unpickling it would run arbitrary code."""


def tiny_cfg(tmp_path, **kw):
    base = dict(dataset="digits", model="small_cnn", epsilon_255=32.0, alpha_255=8.0, attack_steps=2,
                eval_attack_steps=2, perturb="rwp", gamma=0.01, c_min=2.5, k2=2, epochs=2, batch_size=32,
                lr=0.05, train_examples=160, eval_examples=64, out_dir=str(tmp_path / "run"), quiet=True,
                device="cpu", lr_milestones=(1,))
    base.update(kw)
    return RunConfig(**base).validate()


def test_checkpoint_write_is_atomic_and_old_file_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"a": torch.arange(3)})
    original = path.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": torch.arange(5)})
    assert path.read_bytes() == original            # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # and no temporary file is left behind


def test_corrupt_and_foreign_checkpoints_give_clear_errors_and_stay_on_disk(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="bad.pt: not an rwp-fast checkpoint: cannot be read"):
        load_checkpoint(bad)
    assert bad.read_bytes() == b"this is not a zip file"
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an rwp-fast checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary Python objects is not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_piecewise_and_cosine_schedules_per_iteration():
    cfg = RunConfig(lr_schedule="piecewise", lr_milestones=(100, 150), lr_decay=10.0, epochs=200)
    assert lr_factor(cfg, 100 * 391 - 1, 391) == 1.0
    assert lr_factor(cfg, 100 * 391, 391) == pytest.approx(0.1)
    assert lr_factor(cfg, 150 * 391, 391) == pytest.approx(0.01)
    cos = cfg.replace(lr_schedule="cosine")
    assert lr_factor(cos, 0, 391) == 1.0
    assert lr_factor(cos, 100 * 391, 391) == pytest.approx(0.5)  # set per iteration: half-way is 0.5


def test_fit_writes_metrics_checkpoints_and_lsc_diagnostics(tmp_path):
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, log=lambda *_: None)
    rows = trainer.fit()
    assert [r["epoch"] for r in rows] == [1, 2]
    files = sorted(os.listdir(cfg.out_dir))
    assert {"best.pt", "last.pt", "metrics.jsonl", "config.json"} <= set(files)
    # the mode the steps ran in, beside the one asked for (CPU: eager, neither compiled nor captured)
    assert json.load(open(os.path.join(cfg.out_dir, "config.json")))["step_mode"] == "eager"
    lines = [json.loads(x) for x in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert len(lines) == 2
    assert [r["step_modes"] for r in lines] == [{"eager": 5}, {"eager": 5}]  # each step as it really ran
    for key in ("train_robust_loss", "train_robust_acc", "train_natural_loss", "train_natural_acc",
                "test_natural_acc", "test_robust_acc", "test_robust_loss", "lr", "seconds",
                "images_per_second", "lsc_mask_fraction", "rwp_steps_mean", "v_norm_ratio"):
        assert key in lines[0], key
    # 160 examples / 32 = 5 steps per epoch; lr drops ÷10 at epoch 1, so epoch 2 ends at 0.005
    assert lines[1]["step"] == 10 and lines[1]["lr"] == pytest.approx(0.005)
    assert 0 < lines[0]["rwp_steps_mean"] <= 2 and 0 < len(lines[0]["lsc_mask_fraction"]) <= 2
    # layer scope: ‖v_l‖ = γ‖w_l‖ for every tensor, so ‖v‖/‖w‖ = γ over all of them
    assert lines[0]["v_norm_ratio"] == pytest.approx(0.01, rel=1e-3)
    state = load_checkpoint(os.path.join(cfg.out_dir, "last.pt"))
    assert state["epoch"] == 2 and state["step"] == 10 and state["metrics_lines"] == 2
    best = max(r["test_robust_acc"] for r in lines)
    assert state["best_metric"] == best


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    Trainer(cfg, log=lambda *_: None).fit()
    state = load_checkpoint(os.path.join(cfg.out_dir, "last.pt"))
    other = Trainer(cfg.replace(gamma=0.02), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="config differs"):
        other.load_state_dict(state)


def _train_cmd(out_dir, epochs):
    return [sys.executable, "-m", "rwp_fast.cli", "train", "--dataset", "digits", "--model", "small_cnn",
            "--epsilon", "32", "--alpha", "8", "--attack-steps", "3", "--eval-attack-steps", "2",
            "--perturb", "rwp", "--c-min", "2.0", "--k2", "3", "--epochs", str(epochs), "--batch-size", "32",
            "--train-examples", "640", "--eval-examples", "64", "--lr", "0.05", "--lr-milestones", "2",
            "--device", "cpu", "--quiet", "--out-dir", str(out_dir)]


# The CLI in a child that SIGKILLs itself right after global step argv[1]: the kill lands at a chosen step
# whatever the machine's speed (a wall-clock sleep after epoch 1's checkpoint landed past epoch 2 on a fast
# idle machine, and could land before epoch 2's first step on a loaded one).
KILLED_AT_STEP = """
import os, signal, sys
from rwp_fast import cli
from rwp_fast.train import Trainer
kill_at, real_init = int(sys.argv[1]), Trainer.__init__
def init(self, *a, **kw):
    real_init(self, *a, **kw)
    self.after_step = lambda t: t.step == kill_at and os.kill(os.getpid(), signal.SIGKILL)
Trainer.__init__ = init
sys.exit(cli.main(sys.argv[2:]))
"""


def test_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(straight, 3), check=True, env=env, capture_output=True)

    # 640 examples / batch 32 = 20 steps per epoch: step 25 is inside epoch 2, after epoch 1's checkpoint
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_STEP, "25", *_train_cmd(killed, 3)[3:]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    metrics = killed / "metrics.jsonl"
    assert load_checkpoint(killed / "last.pt")["step"] == 20   # epoch 1's checkpoint, not a later one
    done = len(metrics.read_text().splitlines())
    assert done == 1, f"killed after {done} epochs; expected mid-epoch 2"

    resumed = subprocess.run([sys.executable, "-m", "rwp_fast.cli", "train", "--resume", str(killed),
                              "--quiet"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == 60
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    lines_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in metrics.read_text().splitlines()]
    # timings (first_step_s: each process's warm-up), and step_modes, which counts this session's steps of a
    # resumed epoch only
    strip = lambda r: {k: v for k, v in r.items()
                       if k not in ("seconds", "images_per_second", "step_modes", "first_step_s")}
    assert [strip(r) for r in lines_a] == [strip(r) for r in lines_b]


def test_warmup_epochs_run_no_probe_and_the_next_epoch_does(tmp_path):
    """warmup_epochs = 2: epochs 0 and 1 (0-based) are plain training, epoch 2 is the first with probes."""
    from rwp_fast.reference import train_step_ref
    seen = []

    def recording_step(model, optimizer, x, y, cfg, perturb_active=True, generator=None):
        result = train_step_ref(model, optimizer, x, y, cfg, perturb_active=perturb_active, generator=generator)
        seen.append((trainer.epoch, perturb_active, len(result.search.mask_fractions)))
        return result

    # c_min = 10 nats: every loss is in the mask, so an active search always runs its probes
    cfg = tiny_cfg(tmp_path, epochs=3, warmup_epochs=2, c_min=10.0, attack_steps=1, eval_attack_steps=0,
                   train_examples=64, eval_examples=32, backend="reference")
    trainer = Trainer(cfg, step_fn=recording_step, log=lambda *_: None)
    rows = trainer.fit()
    by_epoch = {e: {(a, n) for ep, a, n in seen if ep == e} for e in range(3)}
    assert by_epoch == {0: {(False, 0)}, 1: {(False, 0)}, 2: {(True, 2)}}
    assert [r["perturb_active"] for r in rows] == [False, False, True]
    assert [r["rwp_steps_mean"] for r in rows] == [0.0, 0.0, 2.0]
    assert rows[1]["lsc_mask_fraction"] == [] and rows[2]["lsc_mask_fraction"] == [1.0, 1.0]


def test_resume_may_extend_epochs_and_equals_the_longer_run(tmp_path):
    """--epochs upward on resume: milestones stay where they were set, and the extended run is step for
    step the run started with the larger epoch count."""
    from rwp_fast.config import ConfigError
    kw = dict(epochs=2, attack_steps=1, eval_attack_steps=1, train_examples=64, eval_examples=32, k2=1)
    straight = Trainer(tiny_cfg(tmp_path / "a", **{**kw, "epochs": 3}), log=lambda *_: None)
    straight.fit()
    short = tiny_cfg(tmp_path / "b", **kw)
    Trainer(short, log=lambda *_: None).fit()
    with pytest.raises(ConfigError, match="epochs: a resumed run can only be extended"):
        Trainer.resume(short.out_dir, epochs=1, log=lambda *_: None)
    extended = Trainer.resume(short.out_dir, epochs=3, log=lambda *_: None)
    rows = extended.fit()
    assert [r["epoch"] for r in rows] == [3] and extended.cfg.epochs == 3
    assert rows[0]["lr"] == pytest.approx(0.005)  # milestone 1 kept: the added epoch runs at the final lr
    a, b = straight.model.state_dict(), extended.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.load(open(os.path.join(short.out_dir, "config.json")))["config"]["epochs"] == 3
    cos = tiny_cfg(tmp_path / "c", **{**kw, "epochs": 1, "lr_schedule": "cosine"})
    Trainer(cos, log=lambda *_: None).fit()
    with pytest.raises(ConfigError, match="cosine lr schedule"):
        Trainer.resume(cos.out_dir, epochs=2, log=lambda *_: None)


def test_resuming_a_run_from_before_the_stratified_subsets_says_its_metrics_mix_two(tmp_path):
    kw = dict(epochs=1, attack_steps=1, eval_attack_steps=1, train_examples=64, eval_examples=32, k2=1)
    cfg = tiny_cfg(tmp_path / "old", **kw)
    Trainer(cfg, log=lambda *_: None).fit()
    lines = []
    Trainer.resume(cfg.out_dir, epochs=2, log=lines.append)
    assert not any("warning" in str(x) for x in lines)  # same subsets: nothing to say
    path = os.path.join(cfg.out_dir, "config.json")
    info = json.load(open(path))
    del info["eval_subsets"]  # what an rwp-fast before the stratified subsets wrote
    json.dump(info, open(path, "w"))
    Trainer.resume(cfg.out_dir, epochs=2, log=lines.append)
    (warning,) = [x for x in lines if "warning" in str(x)]
    assert "unrecorded subset" in warning and "mixes two evaluation subsets" in warning


def test_plot_draws_masks_only_for_masked_runs_with_legends_title_and_visible_markers(tmp_path, monkeypatch):
    """Three runs whose best points coincide (as in the demo): the right panel holds only the RWP run (AT
    and AWP have no mask and are named as such), both panels have legends, the title names data, model
    and ε, and the coinciding best markers have distinct sizes, so none hides another."""
    import matplotlib.figure

    from rwp_fast.train.plots import plot_runs
    dirs = []
    for name, perturb in (("at", "none"), ("awp", "awp"), ("rwp", "rwp")):
        run = tmp_path / name
        run.mkdir()
        cfg = RunConfig(dataset="digits", model="small_cnn", epsilon_255=32.0, perturb=perturb)
        (run / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
        mask = {"none": [], "awp": [1.0], "rwp": [0.5]}[perturb]
        rows = [{"epoch": e, "test_robust_acc": [0.5, 0.8, 0.7][e - 1], "lsc_mask_fraction": mask} for e in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(run))
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k))[1])
    plot_runs(dirs, tmp_path / "curves.png", labels=["AT", "AT-AWP", "AT-RWP"])
    (fig,) = figures
    ax_acc, ax_mask = fig.axes
    assert [line.get_label() for line in ax_mask.get_lines()] == ["AT-RWP"]
    assert "no mask (not drawn): AT, AT-AWP" in [t.get_text() for t in ax_mask.texts]
    assert ax_mask.get_legend() is not None and ax_acc.get_legend() is not None
    assert fig._suptitle.get_text() == "digits · small_cnn · L∞ ε = 32/255 · PGD-20 test"
    best = [m for m in ax_acc.get_lines() if m.get_marker() == "D"]
    assert [tuple(m.get_xydata()[0]) for m in best] == [(2.0, 80.0)] * 3
    assert len({m.get_markersize() for m in best}) == 3  # nested, not stacked
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_a_run_saved_with_the_old_field_names_resumes_evaluates_and_exports(tmp_path):
    """A run directory from before epsilon/alpha became epsilon_255/alpha_255: its config.json and
    checkpoints name the old fields, and --resume, `rwp-fast eval` and `export` still take it."""
    from rwp_fast.cli import main
    cfg = tiny_cfg(tmp_path, epochs=1, attack_steps=1, eval_attack_steps=1, train_examples=64, eval_examples=16,
                   k2=1)
    Trainer(cfg, log=lambda *_: None).fit()

    def old_names(d):
        d = dict(d)
        d["epsilon"], d["alpha"] = d.pop("epsilon_255"), d.pop("alpha_255")
        return d

    for name in ("last.pt", "best.pt"):
        path = os.path.join(cfg.out_dir, name)
        state = load_checkpoint(path)
        state["config"] = old_names(state["config"])
        save_checkpoint(path, state)
    config_path = os.path.join(cfg.out_dir, "config.json")
    info = json.load(open(config_path))
    info["config"] = old_names(info["config"])
    json.dump(info, open(config_path, "w"))
    best = os.path.join(cfg.out_dir, "best.pt")
    assert main(["eval", best, "--n-examples", "8", "--attacks", "natural,fgsm", "--device", "cpu",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert main(["export", best, "--format", "robustbench", "--out", str(tmp_path / "export")]) == 0
    assert json.load(open(tmp_path / "export" / "model_card.json"))["eps"] == pytest.approx(32 / 255)
    resumed = Trainer.resume(cfg.out_dir, epochs=2, log=lambda *_: None)
    assert (resumed.cfg.epsilon_255, resumed.cfg.alpha_255) == (32.0, 8.0)
    assert [r["epoch"] for r in resumed.fit()] == [2]
