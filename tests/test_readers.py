"""The shape-checking readers (rwp_fast/readers.py, and load_checkpoint for checkpoints), fed bad files:
each error is one line naming the file and what is wrong. And what must be read, not refused: a null
accuracy in metrics.jsonl is "not measured"."""

import json
import os

import pytest
import torch

from rwp_fast import readers
from rwp_fast.config import RunConfig
from rwp_fast.train.checkpoint import CheckpointError, load_checkpoint

GOOD_ROW = {"epoch": 1, "test_robust_acc": 0.5, "test_natural_acc": 0.9, "lsc_mask_fraction": [0.25]}


def _lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# (reader, file name, content, what the one line must say)
BAD_FILES = [
    ("config", "config.json", "[]", "holds a list, not an object"),
    ("config", "config.json", "{}", "has no 'config' entry"),
    ("config", "config.json", '{"config": []}', "config: holds list"),
    ("config", "config.json", '{"config": {"epochs": "ten"}}', "field epochs is 'ten', expected an integer"),
    ("config", "config.json", '{"config": {"compile_mode": ["a"]}}', "field compile_mode is ['a'], expected a string"),
    ("config", "config.json", '{"config": {"no_such_field": 1}}', "unknown field(s) ['no_such_field']"),
    ("config", "config.json", '{"config": ', "not valid JSON"),
    ("config", "config.json", b"\xff\xfe\x00", "not valid JSON"),
    ("metrics", "metrics.jsonl", _lines(GOOD_ROW, '{"epoch": 2,'), "line 2 is not valid JSON"),
    ("metrics", "metrics.jsonl", _lines([1, 2]), "line 1 holds a list, not an object"),
    ("metrics", "metrics.jsonl", _lines({"test_robust_acc": 0.1}), "line 1 has no 'epoch'"),
    ("metrics", "metrics.jsonl", _lines({**GOOD_ROW, "epoch": 0}), "epoch is 0; expected an integer >= 1"),
    (
        "metrics",
        "metrics.jsonl",
        _lines({**GOOD_ROW, "test_robust_acc": 1.5}),
        "test_robust_acc is 1.5; expected a number in [0, 1]",
    ),
    ("metrics", "metrics.jsonl", _lines({**GOOD_ROW, "test_natural_acc": "0.9"}), "test_natural_acc is '0.9'"),
    ("metrics", "metrics.jsonl", _lines({**GOOD_ROW, "lsc_mask_fraction": "half"}), "lsc_mask_fraction is 'half'"),
    ("sweep", "sweep.json", "{}", "'keys' is missing"),
    ("sweep", "sweep.json", '{"keys": "k2", "points": []}', "'keys' is a string"),
    ("sweep", "sweep.json", '{"keys": ["k2"], "points": [{"values": {"k2": 1}, "runs": []}]}', "point 1 is not"),
    (
        "sweep",
        "sweep.json",
        '{"keys": ["k2"], "points": [{"values": {}, "label": "a", "runs": []}]}',
        "point 1 has values for [], but the keys are ['k2']",
    ),
    (
        "sweep",
        "sweep.json",
        '{"keys": [], "points": [{"values": {}, "label": "a", "runs": [{"dir": "../x"}]}]}',
        "a directory name inside the sweep directory",
    ),
    ("eval", "e.json", '{"config": {}, "git_commit": "abc"}', "'results' is missing"),
    ("eval", "e.json", '{"results": {"n": "all", "natural": 0.5}}', "results.n is 'all'"),
    ("eval", "e.json", '{"results": {"n": 10}}', "holds no attack's accuracy"),
    (
        "eval",
        "e.json",
        '{"results": {"n": 10, "natural": 97.5}}',
        "results.natural is 97.5; expected an accuracy in [0, 1]",
    ),
    ("eval", "e.json", '{"results": {"n": 10, "natural": 0.9}, "weights": "both"}', "'weights' is 'both'"),
    ("done", "done.json", '{"epochs": "3"}', "'epochs' is '3'"),
]
READERS = {
    "config": readers.read_run_config,
    "metrics": readers.read_metrics,
    "sweep": readers.read_sweep_file,
    "done": readers.read_done,
    "eval": lambda d: readers.read_eval_report(os.path.join(d, "e.json")),
}


@pytest.mark.parametrize(
    "reader,name,content,needle", BAD_FILES, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_FILES)]
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, reader, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(readers.FileShapeError) as e:
        READERS[reader](str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert needle in message, (needle, message)
    assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())  # read only


def test_good_files_of_each_kind_are_read(tmp_path):
    cfg = RunConfig(epochs=3)
    (tmp_path / "config.json").write_text(
        json.dumps({"config": {**cfg.to_dict(), "epsilon": 8.0, "epsilon_255": 8.0}, "git_commit": "abc"})
    )
    assert readers.read_run_config(str(tmp_path))["config"]["epochs"] == 3  # old field name mapped
    assert readers.read_run_config(str(tmp_path / "none")) is None
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        readers.read_run_config(str(tmp_path / "none"), required=True)
    (tmp_path / "metrics.jsonl").write_text(_lines(GOOD_ROW, {**GOOD_ROW, "epoch": 2, "test_robust_acc": None}))
    rows = readers.read_metrics(str(tmp_path))
    assert len(rows) == 2 and readers.measured(rows) == [(1, 0.5)]
    (tmp_path / "e.json").write_text(
        json.dumps(
            {"results": {"n": 4, "natural": 1.0, "natural_seconds": 0.1}, "weights": "ema", "config": cfg.to_dict()}
        )
    )
    assert readers.read_eval_report(str(tmp_path / "e.json"))["weights"] == "ema"


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.update(config=[]), "its config: holds list"),
        (lambda s: s["config"].update(lr="fast"), "its config: field lr is 'fast', expected a number"),
        (lambda s: s.update(epoch=-1), "epoch is -1, expected an integer >= 0"),
        (lambda s: s.update(model=[1, 2]), "'model' is not a state dict of tensors"),
    ],
)
def test_a_checkpoint_of_the_wrong_shape_is_one_line(tmp_path, change, needle):
    state = {
        "format_version": 1,
        "config": RunConfig().to_dict(),
        "epoch": 1,
        "step": 4,
        "model": {"w": torch.zeros(2)},
        "optimizer": {},
        "scheduler": {},
        "rng": {},
    }
    change(state)
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "last.pt")
    assert "\n" not in str(e.value) and str(tmp_path / "last.pt") in str(e.value) and needle in str(e.value)


def _null_run(tmp_path, name, accs):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": RunConfig(perturb="rwp").to_dict()}))
    (run / "metrics.jsonl").write_text(
        _lines(
            *[{**GOOD_ROW, "epoch": i + 1, "test_robust_acc": a, "images_per_second": None} for i, a in enumerate(accs)]
        )
    )
    return run


def test_a_null_robust_accuracy_is_not_measured_in_plot_and_sweep_summary(tmp_path, capsys):
    """plot draws the measured epochs (not 0 for the null one), and the sweep statistics skip it."""
    from rwp_fast.cli import main
    from rwp_fast.sweep.stats import read_rows, run_stats

    run = _null_run(tmp_path, "a", [0.4, None, 0.6, 0.5])
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    rows = read_rows(str(run))
    stats = run_stats(rows)
    assert [r["epoch"] for r in rows] == [1, 3, 4]
    assert (stats["best_robust"], stats["last_robust"], stats["img_s"]) == (60.0, 50.0, None)
    # a run without any measured epoch is left out, not an error
    none = _null_run(tmp_path, "b", [None])
    assert read_rows(str(none)) == []
    assert main(["plot", str(run), str(none), "--out", str(tmp_path / "c.png")]) == 0


def test_a_diverged_runs_nan_loss_is_read_and_a_nan_accuracy_refused(tmp_path):
    """A run whose loss diverged writes NaN (json's NaN): its own metrics.jsonl reads back, so plot, resume and
    sweep summaries still work; an accuracy (a count over examples) is never NaN."""
    (tmp_path / "metrics.jsonl").write_text(_lines({**GOOD_ROW, "train_robust_loss": float("nan")}))
    (row,) = readers.read_metrics(tmp_path)
    assert row["train_robust_loss"] != row["train_robust_loss"]  # NaN, kept
    (tmp_path / "metrics.jsonl").write_text(_lines({**GOOD_ROW, "test_natural_acc": float("nan")}))
    with pytest.raises(readers.FileShapeError, match="test_natural_acc is nan"):
        readers.read_metrics(tmp_path)


def test_an_existing_output_directory_is_probed_inside_not_in_its_parent(tmp_path, monkeypatch):
    """A writable directory in a read-only parent ($SCRATCH/$USER, $HOME) is a valid --out-dir: the write probe
    goes where the files will be written. (As root the permission itself cannot be tested; the probe's place can.)"""
    import tempfile

    from rwp_fast import _fs
    probed, real_mkstemp = [], tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: probed.append(kw["dir"]) or real_mkstemp(**kw))
    (tmp_path / "run").mkdir()
    _fs.check_output_dir(tmp_path / "run", "out_dir")
    _fs.check_output_file(tmp_path / "run" / "report.json", "out", "eval")
    assert probed == [str(tmp_path / "run"), str(tmp_path / "run")]


@pytest.mark.parametrize("writer", ["verify", "bench"])
def test_a_json_report_at_the_longest_allowed_name_is_written(tmp_path, writer):
    """The output check admits a name of NAME_MAX bytes: the atomic write's temporary name must fit too."""
    from rwp_fast.bench.common import write_json as bench_write
    from rwp_fast.verify.run import write_json as verify_write
    path = tmp_path / ("r" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5) + ".json")
    (verify_write if writer == "verify" else bench_write)({"rows": [1]}, str(path))
    assert json.loads(path.read_text()) == {"rows": [1]} and os.listdir(tmp_path) == [path.name]
