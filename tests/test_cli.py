"""The command line: clear one-line errors (no traceback), presets, eval output."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rwp_fast.cli import build_parser, config_from_args, main


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
    assert code == 2 and "epsilon: must be a number >= 0, got -8.0" in err and "Traceback" not in err
    code, _, err = run_cli("train", "--k2", "0", "--out-dir", str(tmp_path / "r"))
    assert code == 2 and "k2: must be >= 1" in err


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
