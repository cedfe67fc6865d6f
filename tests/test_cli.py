"""The command line: clear one-line errors (no traceback), presets, eval output."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cli_helpers
from cli_helpers import one_line_error
from rwp_fast.cli import build_parser, config_from_args, main

tiny_run = cli_helpers.tiny_run  # a module-scoped fixture: a 1-epoch digits run per test module


def run_cli(*argv):
    proc = subprocess.run([sys.executable, "-m", "rwp_fast.cli", *argv], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_missing_cifar_gives_one_clear_message(tmp_path):
    code, out, err = run_cli("train", "--preset", "cifar10-linf-at-rwp", "--data-dir", str(tmp_path),
                             "--out-dir", str(tmp_path / "run"))
    assert code == 2
    assert "Traceback" not in err
    assert str(tmp_path) in err and "--download" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_preset_and_bad_value_name_the_problem(tmp_path):
    code, _, err = run_cli("train", "--preset", "cifar10-nope")
    assert code == 2 and "preset: unknown preset 'cifar10-nope'" in err and "cifar10-linf-at-rwp" in err
    code, _, err = run_cli("train", "--epsilon", "-8", "--out-dir", str(tmp_path / "r"))
    assert code == 2 and "epsilon_255: must be a finite number >= 0, got -8.0" in err and "Traceback" not in err
    code, _, err = run_cli("train", "--k2", "0", "--out-dir", str(tmp_path / "r"))
    assert code == 2 and "k2: must be a finite number >= 1" in err


def test_flags_override_a_preset():
    args = build_parser().parse_args(["train", "--preset", "cifar10-linf-at-rwp", "--c-min", "2.5",
                                      "--no-download", "--lr-milestones", "50", "75"])
    cfg = config_from_args(args)
    assert (cfg.c_min, cfg.gamma, cfg.model, cfg.lr_milestones) == (2.5, 0.01, "preact_resnet18", (50, 75))


def test_help_mirrors_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--c-min", "--k2", "--rwp-update", "--norm-scope", "--warmup-epochs", "--backend"):
        assert flag in text
    assert "LSC upper bound q, in nats" in text  # the help is the field's comment in config.py


def test_corrupt_checkpoint_in_eval_and_resume(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00" * 100)
    code, _, err = run_cli("eval", str(bad))
    assert code == 2 and "cannot be read" in err and "Traceback" not in err
    code, _, err = run_cli("train", "--resume", str(tmp_path))
    assert code == 2 and "cannot be read" in err
    assert bad.read_bytes() == b"\x00" * 100


def test_eval_without_pyautoattack_says_how_to_install(tmp_path, monkeypatch):
    from rwp_fast.eval import AutoAttackUnavailable, require_autoattack
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes the import fail
    with pytest.raises(AutoAttackUnavailable, match=r"pip install 'rwp-fast\[eval\]'"):
        require_autoattack()


def test_train_then_eval_writes_table_and_json(tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--dataset", "digits", "--epochs", "1", "--attack-steps", "1",
                             "--eval-attack-steps", "1", "--train-examples", "128", "--eval-examples", "32",
                             "--batch-size", "64", "--quiet", "--device", "cpu", "--out-dir", str(run))
    assert code == 0, err
    assert (run / "curves.png").exists() and (run / "config.json").exists()
    commit = json.loads((run / "config.json").read_text())["git_commit"]
    assert commit and commit != ""
    code, out, err = run_cli("eval", str(run / "last.pt"), "--n-examples", "20", "--attacks",
                             "natural,fgsm,pgd20", "--device", "cpu", "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    assert "| run | natural | fgsm | pgd20 |" in out
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert res["n"] == 20 and 0 <= res["pgd20"] <= res["fgsm"] + 0.2 and res["pgd20"] <= res["natural"]
    # a second train into the same directory must not clobber the run
    code, _, err = run_cli("train", "--dataset", "digits", "--epochs", "1", "--out-dir", str(run))
    assert code == 2 and "--resume" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    os.remove(tmp_path / "e.json")



# ------------------------------------------------------------------ bad inputs: one line, exit 2
@pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid where there is a GPU")
def test_device_cuda_without_a_gpu(tmp_path, tiny_run, capsys):
    one_line_error(capsys, ["train", "--device", "cuda", "--out-dir", str(tmp_path / "r")],
                   "device: 'cuda'", "one of auto, cpu")
    assert not (tmp_path / "r").exists()  # refused before anything is written
    one_line_error(capsys, ["eval", str(tiny_run / "last.pt"), "--device", "cuda"], "device: 'cuda'",
                   "one of auto, cpu")


@pytest.mark.parametrize("flag,value,needle", [
    ("--epsilon", "inf", "epsilon_255: must be a finite number >= 0, got inf"),
    ("--alpha", "inf", "alpha_255: must be a finite number >= 0"),
    ("--gamma", "nan", "gamma: must be a finite number >= 0"),
    ("--c-min", "nan", "c_min: must be a number >= 0 (inf allowed: no upper bound), got nan"),
    ("--lr", "inf", "lr: must be a finite number >= 0"),
])
def test_non_finite_floats_are_refused(tmp_path, capsys, flag, value, needle):
    one_line_error(capsys, ["train", flag, value, "--out-dir", str(tmp_path / "r")], needle)


def test_eval_counts_must_be_in_range(tiny_run, capsys):
    one_line_error(capsys, ["eval", str(tiny_run / "last.pt"), "--n-examples", "-5"],
                   "n_examples: must be an integer >= 0, got -5")
    one_line_error(capsys, ["eval", str(tiny_run / "last.pt"), "--batch-size", "0"],
                   "batch_size: must be an integer >= 1, got 0")


def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    one_line_error(capsys, ["train", "--precision", "fp16", "--device", "cpu", "--out-dir", str(tmp_path / "r")],
                   "precision: 'fp16' needs a CUDA device", "one of auto, fp32, bf16")


def test_plot_of_a_corrupt_metrics_file_names_file_and_line(tmp_path, tiny_run, capsys):
    run = tmp_path / "run"
    run.mkdir()
    good = (tiny_run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(good + "\n" + good[: len(good) // 2] + "\n")
    one_line_error(capsys, ["plot", str(run), "--out", str(tmp_path / "c.png")],
                   str(run / "metrics.jsonl"), "line 2 is not valid JSON")
    assert not (tmp_path / "c.png").exists()


def test_checkpoint_of_another_model_says_which_in_one_line(tmp_path, tiny_run, capsys):
    state = torch.load(tiny_run / "last.pt", weights_only=True)
    state["config"]["model"] = "preact_resnet18"
    torch.save(state, tmp_path / "last.pt")
    err = one_line_error(capsys, ["eval", str(tmp_path / "last.pt")],
                         "its config says model preact_resnet18, but the weights are from small_cnn", "keys differ")
    assert len(err) < 400
    # resume of the same file: the same one-line diagnosis
    one_line_error(capsys, ["train", "--resume", str(tmp_path)], "the weights are from small_cnn")


def test_resume_with_preset_or_flags_says_what_to_drop(tiny_run, capsys):
    err = one_line_error(capsys, ["train", "--resume", str(tiny_run), "--preset", "cifar10-linf-at-rwp"],
                         "drop --preset (allowed with --resume: --quiet, --device, --epochs)")
    assert "[]" not in err
    one_line_error(capsys, ["train", "--resume", str(tiny_run), "--gamma", "0.02"], "drop --gamma")
    # a field whose flag is not its name: the message names the flag users type (--epsilon, not --epsilon-255)
    one_line_error(capsys, ["train", "--resume", str(tiny_run), "--epsilon", "4"], "drop --epsilon (allowed")


def test_num_workers_is_no_longer_a_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--num-workers", "4"])
    assert exc.value.code == 2 and "--num-workers" in capsys.readouterr().err


def test_help_lists_the_allowed_values():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "one of digits, cifar10, cifar100, svhn, synthetic" in " ".join(text.split())
    assert "one of small_cnn, preact_resnet18, wrn-34-10, wrn-28-10" in " ".join(text.split())
    assert "DATASETS" not in text and "MODELS" not in text


def test_eval_default_attacks_fit_an_l2_checkpoint(tmp_path, capsys, monkeypatch):
    """An L2 run evaluates with its default list: natural, FGM (for FGSM), PGD-20/100, C&W and AutoAttack in
    L2. AutoAttack is stubbed here (the suite's own AutoAttack test lives in test_eval.py); the stub records
    the norm it was given."""
    import types
    seen = {}

    class FakeAutoAttack:
        def __init__(self, model, eps, norm, **kw):
            seen.update(eps=eps, norm=norm)

        def run_standard_evaluation(self, x, y, batch_size):
            return x, y  # pyautoattack 0.2.0 returns (x_adv, y_adv); here no point is flipped

    monkeypatch.setitem(sys.modules, "pyautoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    run = tmp_path / "l2"
    assert main(["train", "--dataset", "digits", "--norm", "l2", "--epsilon", "128", "--alpha", "32",
                 "--epochs", "1", "--attack-steps", "1", "--eval-attack-steps", "1", "--train-examples", "64",
                 "--eval-examples", "16", "--batch-size", "32", "--quiet", "--device", "cpu",
                 "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run / "last.pt"), "--n-examples", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: L2 checkpoint: FGSM (an L∞ attack) is replaced by FGM" in out
    assert "| l2 | natural | fgm | pgd20 | pgd100 | cw | autoattack |" in out
    assert seen == {"eps": 128 / 255, "norm": "L2"}
    res = json.loads((run / "last_eval.json").read_text())["results"]
    assert set(res) >= {"n", "natural", "fgm", "pgd20", "pgd100", "cw", "autoattack"} and "fgsm" not in res
