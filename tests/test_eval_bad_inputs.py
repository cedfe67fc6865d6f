"""The last bad inputs of eval / export / bench (issue 21): one line, exit 2, nothing written. New cases go
in the table of tests/test_bad_inputs.py."""

import os

import pytest

import cli_helpers
from cli_helpers import one_line_error
from rwp_fast.cli import main

tiny_run = cli_helpers.tiny_run  # a module-scoped fixture: a 1-epoch digits run per test module


@pytest.fixture
def checkpoint(tiny_run):
    return tiny_run / "last.pt"


@pytest.fixture
def not_a_checkpoint(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(7, 207)))
    return path


def test_eval_of_a_non_checkpoint_says_so_in_one_line(tmp_path, not_a_checkpoint, capsys):
    err = one_line_error(capsys, ["eval", str(not_a_checkpoint), "--out", str(tmp_path / "e.json")],
                         f"checkpoint {not_a_checkpoint}: not an rwp-fast checkpoint",
                         "not the zip archive torch.save writes", "first bytes: 07 08 09")
    assert "weights_only" not in err and "http" not in err
    assert sorted(os.listdir(tmp_path)) == ["random.pt"]


def test_export_of_a_non_checkpoint_says_so_in_one_line(tmp_path, not_a_checkpoint, capsys):
    one_line_error(capsys, ["export", str(not_a_checkpoint), "--out", str(tmp_path / "x")],
                   "not an rwp-fast checkpoint", "not the zip archive")
    assert sorted(os.listdir(tmp_path)) == ["random.pt"]


def test_a_checkpoint_with_pickled_objects_says_why_in_one_line(tmp_path, capsys):
    import torch
    torch.save({"model": tmp_path}, tmp_path / "obj.pt")   # a PosixPath: refused by a weights-only load
    one_line_error(capsys, ["eval", str(tmp_path / "obj.pt")], "not an rwp-fast checkpoint",
                   "objects that a weights-only load refuses", "pathlib")


def test_export_still_writes_into_a_new_directory(tmp_path, checkpoint, capsys):
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "a" / "b")]) == 0
    assert {"model.pt", "model_card.json"} <= set(os.listdir(tmp_path / "a" / "b"))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_refuses_a_batch_size_below_one(tmp_path, capsys, value):
    out = tmp_path / "b.json"
    one_line_error(capsys, ["bench", "--device", "cpu", "--batch-size", value, "--json", str(out)],
                   "batch_size: must be an integer >= 1", f"got {value}")
    assert not out.exists()
