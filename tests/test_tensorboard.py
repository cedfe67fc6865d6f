"""--tensorboard: the event file holds every scalar that metrics.jsonl holds; without the package, one line."""

import json
import sys

import pytest

from rwp_fast import cli

TINY = ["--dataset", "digits", "--model", "small_cnn", "--epsilon", "32", "--alpha", "8", "--attack-steps", "1",
        "--eval-attack-steps", "1", "--perturb", "rwp", "--c-min", "2.5", "--k2", "2", "--epochs", "2",
        "--batch-size", "32", "--train-examples", "64", "--eval-examples", "32", "--lr-milestones", "1",
        "--device", "cpu", "--quiet"]


def expected_scalars(row):
    """{tag: value} written independently of rwp_fast.train.tb_log: numbers and booleans, list elements as
    TAG/probe_K (1-based), the steps by mode as step_modes/MODE; the fallbacks' text is no scalar."""
    out = {}
    for key, value in row.items():
        if key in ("epoch", "phase_fallbacks"):
            continue
        if key == "step_modes":
            out.update({f"step_modes/{mode}": float(n) for mode, n in value.items()})
        elif isinstance(value, list):
            out.update({f"{key}/probe_{k}": float(v) for k, v in enumerate(value, start=1)})
        else:
            out[key] = float(value)
    return out


def test_event_file_holds_the_metrics_jsonl_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--ema-decay", "0.9", "--tensorboard", "--out-dir", str(run)]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {}
    for row in rows:
        for tag, value in expected_scalars(row).items():
            want.setdefault(tag, {})[row["epoch"]] = value
    assert tags == set(want)
    assert {"lr", "lsc_mask_fraction/probe_1", "lsc_mask_fraction/probe_2", "test_robust_acc",
            "test_robust_acc_ema", "step_modes/eager"} <= tags
    for tag, per_epoch in want.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(per_epoch, rel=1e-6, abs=1e-6), tag   # float32 in the event file


def test_without_tensorboard_it_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import raises ImportError
    assert cli.main(["train", *TINY, "--tensorboard", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tensorboard: --tensorboard needs the tensorboard package" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
