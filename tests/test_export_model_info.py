"""`rwp-fast export` writes RobustBench's model_info/<dataset>/<threat>/<Name>.json (issue 21)."""

import json

import pytest

from export_helpers import saved_checkpoint
from rwp_fast.cli import main

FIELDS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
          "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable"]


@pytest.fixture
def checkpoint_with_eval(tmp_path):
    path, _ = saved_checkpoint(tmp_path, "preact_resnet18")
    results = {"n": 2000, "natural": 0.8492, "pgd20": 0.55, "autoattack": 0.5049}
    (tmp_path / "run" / "best_eval.json").write_text(json.dumps({"results": results}))
    return path


def test_model_info_is_filled_from_checkpoint_eval_json_and_flags(tmp_path, checkpoint_with_eval, capsys):
    out = tmp_path / "export"
    assert main(["export", str(checkpoint_with_eval), "--out", str(out), "--model-name", "Yu2022Robust",
                 "--paper-name", "Robust Weight Perturbation for Adversarial Training", "--link",
                 "https://arxiv.org/abs/2205.14826", "--authors", "Chaojian Yu, Bo Han", "--venue", "IJCAI 2022"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "model_info" / "synthetic" / "Linf" / "Yu2022Robust.json").read_text())
    assert list(info) == FIELDS
    assert info == {"link": "https://arxiv.org/abs/2205.14826",
                    "name": "Robust Weight Perturbation for Adversarial Training", "authors": "Chaojian Yu, Bo Han",
                    "additional_data": False, "number_forward_passes": 1, "dataset": "synthetic",
                    "venue": "IJCAI 2022", "architecture": "PreActResNet-18", "eps": "8/255", "clean_acc": "84.92",
                    "reported": "50.49", "autoattack_acc": "50.49", "unreliable": False}
    assert "placeholder" not in stdout


def test_what_only_the_user_knows_is_a_named_placeholder(tmp_path, checkpoint_with_eval, capsys):
    out = tmp_path / "export"
    assert main(["export", str(checkpoint_with_eval), "--out", str(out), "--reported", "56.1"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "model_info" / "synthetic" / "Linf" / "RWPFast_run_best.json").read_text())
    for field, flag in (("link", "--link"), ("name", "--paper-name"), ("authors", "--authors"),
                        ("venue", "--venue")):
        assert info[field].startswith("TODO") and flag in info[field]
        assert f"placeholder: {field}: {flag}" in stdout
    assert "placeholder: <Name>: --model-name" in stdout
    assert info["reported"] == "56.10" and info["autoattack_acc"] == "50.49"


def test_unmeasured_accuracies_and_a_subset_are_named(tmp_path, capsys):
    path, _ = saved_checkpoint(tmp_path, "small_cnn")
    (tmp_path / "run" / "best_eval.json").write_text(json.dumps(
        {"results": {"n": 60, "natural": 0.5}, "test_subset": {"n": 60, "of": 2000, "seed": 0, "stratified": True}}))
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--model-name", "Me2026Test"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((tmp_path / "x" / "model_info" / "synthetic" / "Linf" / "Me2026Test.json").read_text())
    assert info["clean_acc"] == "50.00" and info["autoattack_acc"].startswith("TODO")
    assert "placeholder: autoattack_acc" in stdout and "measured on 60 of 2000 test images" in stdout
    assert info["architecture"] == "small_cnn"


def test_a_bad_model_name_is_refused_before_anything_is_written(tmp_path, checkpoint_with_eval, capsys):
    assert main(["export", str(checkpoint_with_eval), "--out", str(tmp_path / "x"), "--model-name", "a/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_name: 'a/b'" in err and not (tmp_path / "x").exists()
