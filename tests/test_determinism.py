"""--deterministic (issue 21): the config field and its CLI flag set deterministic cuDNN, deterministic torch
algorithms and CUBLAS_WORKSPACE_CONFIG; off, they stay at torch's defaults. What a resume then
guarantees is in the README ("Resume and determinism"); on this CPU the run is the same bit for bit."""

import json
import os

import pytest
import torch

from rwp_fast.cli import build_parser, config_from_args, main
from rwp_fast.train.trainer import CUBLAS_WORKSPACE, apply_determinism


@pytest.fixture(autouse=True)
def _restore_global_state(monkeypatch):
    """apply_determinism is process-wide: put torch back as it was for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def test_the_flag_mirrors_the_config_field():
    parse = lambda *argv: config_from_args(build_parser().parse_args(["train", *argv]))
    assert parse().deterministic is False
    assert parse("--deterministic").deterministic is True
    assert parse("--preset", "cifar10-linf-at-rwp", "--deterministic").deterministic is True


def test_apply_determinism_sets_cudnn_torch_and_cublas():
    torch.backends.cudnn.benchmark = True
    apply_determinism(False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    apply_determinism(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_a_user_cublas_setting_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    apply_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def _train(out, *flags):
    assert main(["train", "--dataset", "digits", "--perturb", "rwp", "--k2", "2", "--c-min", "2.3", "--epochs", "1",
                 "--attack-steps", "2", "--eval-attack-steps", "2", "--train-examples", "64", "--eval-examples",
                 "16", "--batch-size", "32", "--quiet", "--device", "cpu", "--backend", "torch", "--out-dir",
                 str(out), *flags]) == 0
    return torch.load(out / "last.pt", weights_only=True)


def test_a_deterministic_cpu_run_trains_and_equals_the_default_one(tmp_path, capsys):
    det = _train(tmp_path / "det", "--deterministic")
    assert torch.are_deterministic_algorithms_enabled()   # the whole step ran under it without an error
    assert json.loads((tmp_path / "det" / "config.json").read_text())["config"]["deterministic"] is True
    torch.use_deterministic_algorithms(False)
    plain = _train(tmp_path / "plain")
    for k, v in plain["model"].items():    # a CPU run is deterministic either way: bit for bit
        assert torch.equal(v, det["model"][k]), k


@pytest.mark.gpu
def test_two_deterministic_gpu_runs_are_equal(tmp_path, capsys):
    """The README's GPU row: with --deterministic two runs of RWP (cuDNN convs, fused ops) give equal weights."""
    def run(out):
        assert main(["train", "--dataset", "synthetic", "--model", "small_cnn", "--perturb", "rwp", "--k2", "3",
                     "--epochs", "1", "--train-examples", "512", "--eval-examples", "64", "--batch-size", "64",
                     "--quiet", "--device", "cuda", "--deterministic", "--out-dir", str(out)]) == 0
        return torch.load(out / "last.pt", weights_only=True)["model"]
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_a_later_run_without_the_flag_is_not_left_deterministic():
    """The flags are process-wide: a sweep's in-process points after a --deterministic one get torch's
    settings back, not a deterministic (slower, op-refusing) run their config does not ask for."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled())
    try:
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        apply_determinism(False)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                torch.are_deterministic_algorithms_enabled()) == before
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2])
