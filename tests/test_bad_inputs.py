"""Bad inputs of every subcommand, one table: THE place where a new case goes (issue 31).

Each case builds an argv (and the files it needs) in a fresh tmp_path next to a real 1-epoch run, runs
``rwp-fast``, and checks that it is refused the way the README promises:
  * exit status 2 (argparse's own for a bad flag, EXIT_USER_ERROR for the rest);
  * one line on stderr that names the argument (or the file) and what is wrong;
  * nothing written and nothing changed: the checksums of every file of the run directory and of
    tmp_path, and the list of files there, are the same before and after.

The mechanisms behind them: the output-path check (rwp_fast/_fs.py), the shape-checking readers
(rwp_fast/readers.py, train/checkpoint.py, data/), the checkpoint-to-run check (train/checkpoint.py) and the
config's value checks (config.py). Tests of the readers one by one, and of what must be read correctly
rather than refused, are at the end.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import cli_helpers
from rwp_fast.cli import main
from rwp_fast.config import EXIT_USER_ERROR

tiny_run = cli_helpers.tiny_run  # a module-scoped fixture: a 1-epoch digits run per test module
LONG = "x" * 300  # a name over NAME_MAX (255 bytes on every common file system)


def snapshot(*roots):
    """{path: sha256} of every file under `roots`, and every directory (as None)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            out[folder] = None
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


class Ctx:
    """What a case builds its input from: the shared run (read only), tmp_path, and copies."""

    def __init__(self, run, tmp, monkeypatch):
        self.run, self.tmp, self.monkeypatch = run, tmp, monkeypatch
        self.ckpt = str(run / "last.pt")
        self.file = tmp / "file"
        self.file.write_text("a file\n")

    def copy(self, name="run"):
        """A copy of the run in tmp_path, for the cases that need one of its files changed."""
        dest = self.tmp / name
        shutil.copytree(self.run, dest)
        return dest

    def write(self, rel, content):
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def pickled(self, rel):
        """A torch.save file holding a Python object that a weights-only load refuses (a PosixPath)."""
        torch.save({"model": self.tmp}, self.tmp / rel)
        return str(self.tmp / rel)

    def checkpoint_with(self, name, **config):
        state = torch.load(self.ckpt, weights_only=True)
        state["config"] = config.pop("whole") if "whole" in config else {**state["config"], **config}
        torch.save(state, self.tmp / name)
        return str(self.tmp / name)

    def dataset_image(self, rel):
        """A PNG as a data set holds it (Pillow's, not a figure rwp-fast drew)."""
        from PIL import Image

        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
        return str(path)

    def one_class_npz(self):
        x = np.zeros((6, 8, 8, 1), dtype=np.uint8)
        np.savez(self.tmp / "one.npz", x_train=x, y_train=np.zeros(6, np.int64), x_test=x, y_test=np.zeros(6, np.int64))
        return str(self.tmp / "one.npz")


def _with_file(c, rel, text):
    c.write(rel, text)
    return c.tmp / rel.split("/")[0]


def _edited_run(c, edit):
    run = c.copy()
    edit(run)
    return str(run)


def _set_config(run, **fields):
    info = json.loads((run / "config.json").read_text())
    info["config"].update(fields)
    (run / "config.json").write_text(json.dumps(info))


def _backend_env(c, value, command="train"):
    c.monkeypatch.setenv("RWP_FAST_BACKEND", value)
    return [command, "--out-dir", str(c.tmp / "r")]


TRAIN = ["--dataset", "digits", "--device", "cpu", "--epochs", "1", "--quiet"]
# (id, argv from a Ctx, what the one line must say)
CASES = [
    # ---- outputs: a run's files, directories, paths under a file, names too long, other files
    (
        "eval-out-config-json",
        lambda c: ["eval", c.ckpt, "--out", str(c.run / "config.json")],
        ["out: ", "is a run's config.json, which no command writes over"],
    ),
    ("eval-out-metrics", lambda c: ["eval", c.ckpt, "--out", str(c.run / "metrics.jsonl")], ["out: ", "metrics.jsonl"]),
    ("eval-out-checkpoint", lambda c: ["eval", c.ckpt, "--out", c.ckpt], ["out: ", "is a run's last.pt"]),
    ("eval-out-empty", lambda c: ["eval", c.ckpt, "--out", ""], ["out: the path is empty"]),
    (
        "eval-out-trailing-slash",
        lambda c: ["eval", c.ckpt, "--out", str(c.tmp / "new") + "/"],
        ["named as a directory"],
    ),
    ("train-out-dir-empty", lambda c: ["train", *TRAIN, "--out-dir", " "], ["out_dir: the path is empty"]),
    ("eval-out-directory", lambda c: ["eval", c.ckpt, "--out", str(c.tmp)], ["out: ", "is a directory"]),
    (
        "eval-out-under-file",
        lambda c: ["eval", c.ckpt, "--out", str(c.file / "e.json")],
        ["out: ", "lies under", "which is a file"],
    ),
    (
        "eval-out-too-long",
        lambda c: ["eval", c.ckpt, "--out", str(c.tmp / (LONG + ".json"))],
        ["out: the name", "over this file system's limit"],
    ),
    (
        "eval-out-missing-dir",
        lambda c: ["eval", c.ckpt, "--out", str(c.tmp / "missing" / "e.json")],
        ["out: the directory", "does not exist"],
    ),
    (
        "eval-out-data-file",
        lambda c: ["eval", c.ckpt, "--out", c.one_class_npz()],
        ["out: ", "exists and is not an earlier rwp-fast eval report"],
    ),
    ("verify-json-directory", lambda c: ["verify", "--json", str(c.tmp)], ["json: ", "is a directory"]),
    ("verify-json-under-file", lambda c: ["verify", "--json", str(c.file / "v.json")], ["json: ", "lies under"]),
    ("verify-json-too-long", lambda c: ["verify", "--json", str(c.tmp / (LONG + ".json"))], ["json: the name"]),
    ("verify-json-run-file", lambda c: ["verify", "--json", str(c.run / "config.json")], ["json: ", "config.json"]),
    (
        "bench-json-directory",
        lambda c: ["bench", "--device", "cpu", "--json", str(c.tmp)],
        ["json: ", "is a directory"],
    ),
    (
        "bench-json-under-file",
        lambda c: ["bench", "--device", "cpu", "--json", str(c.file / "b.json")],
        ["json: ", "lies under"],
    ),
    (
        "bench-json-too-long",
        lambda c: ["bench", "--device", "cpu", "--json", str(c.tmp / (LONG + ".json"))],
        ["json: the name"],
    ),
    (
        "bench-plot-data-image",
        lambda c: ["bench", "--device", "cpu", "--plot", c.dataset_image("imgs/a.png")],
        ["plot: ", "exists and is not an earlier figure"],
    ),
    (
        "plot-out-metrics",
        lambda c: ["plot", str(c.run), "--out", str(c.run / "metrics.jsonl")],
        ["out: ", "metrics.jsonl"],
    ),
    (
        "plot-out-data-image",
        lambda c: ["plot", str(c.run), "--out", c.dataset_image("data/train/0/a.png")],
        ["out: ", "is not an earlier figure"],
    ),
    ("plot-out-directory", lambda c: ["plot", str(c.run), "--out", str(c.tmp)], ["out: ", "is a directory"]),
    (
        "train-tensorboard-tb-is-a-file",
        lambda c: ["train", *TRAIN, "--tensorboard", "--out-dir", str(_with_file(c, "new/tb", "not a directory"))],
        ["tensorboard: ", "tb' is a file"],
    ),
    (
        "train-out-dir-under-file",
        lambda c: ["train", *TRAIN, "--out-dir", str(c.file / "run")],
        ["out_dir: ", "lies under"],
    ),
    (
        "train-nproc-out-dir-under-file",
        lambda c: ["train", *TRAIN, "--nproc", "2", "--out-dir", str(c.file / "run")],
        ["out_dir: ", "lies under"],
    ),
    ("train-out-dir-too-long", lambda c: ["train", *TRAIN, "--out-dir", str(c.tmp / LONG)], ["out_dir: the name"]),
    (
        "train-out-dir-holds-metrics",
        lambda c: ["train", *TRAIN, "--out-dir", _edited_run(c, lambda r: os.remove(r / "last.pt"))],
        ["out_dir: ", "holds a run's metrics.jsonl but no last.pt"],
    ),
    (
        "train-out-dir-is-a-sweep",
        lambda c: ["train", *TRAIN, "--out-dir", str(_with_file(c, "sw/sweep.json", "{}"))],
        ["out_dir: ", "is a sweep directory"],
    ),
    (
        "sweep-out-dir-is-a-run",
        lambda c: ["sweep", "--grid", "k2=1,2", "--out-dir", str(c.run)],
        ["out_dir: ", "holds a run"],
    ),
    (
        "export-out-under-file",
        lambda c: ["export", c.ckpt, "--out", str(c.file / "sub" / "x")],
        ["out: ", "lies under"],
    ),
    (
        "export-out-foreign-card",
        lambda c: ["export", c.ckpt, "--out", str(_with_file(c, "x/model_card.json", "{}"))],
        ["out: ", "model_card.json' exists and is not an earlier model card"],
    ),
    (
        "export-out-foreign-model-pt",
        lambda c: ["export", c.ckpt, "--out", str(_with_file(c, "x/model.pt", "weights"))],
        ["out: ", "model.pt' exists and is not an earlier model.pt of rwp-fast export"],
    ),
    (
        "sweep-out-dir-is-a-file",
        lambda c: ["sweep", "--grid", "k2=1,2", "--out-dir", str(c.file)],
        ["out_dir: ", "is a file"],
    ),
    (
        "sweep-summary-png-is-a-dir",
        lambda c: ["sweep", "--summarize", str(_with_file(c, "sw/summary.png/x", ""))],
        ["summarize: ", "summary.png' is a directory"],
    ),
    (
        "sweep-summary-csv-foreign",
        lambda c: ["sweep", "--summarize", str(_with_file(c, "sw/summary.csv", "a,b\n"))],
        ["summarize: ", "is not an earlier sweep summary"],
    ),
    (
        "demo-lsc-analysis-dir-is-a-file",
        lambda c: ["demo", "--lsc-analysis", "--out-dir", str(_with_file(c, "d/lsc-analysis", "x"))],
        ["out_dir: ", "lsc-analysis' is a file"],
    ),
    ("demo-out-dir-is-a-file", lambda c: ["demo", "--out-dir", str(c.file)], ["out_dir: ", "is a file"]),
    (  # the third run's directory: refused before the first two train
        "demo-run-dir-is-a-file",
        lambda c: ["demo", "--out-dir", str(_with_file(c, "d/at-rwp", "x"))],
        ["out_dir: ", "at-rwp' is a file"],
    ),
    # ---- inputs read by their shape: one line naming the file and how it is wrong
    (
        "resume-config-json-is-a-list",
        lambda c: ["train", "--resume", _edited_run(c, lambda r: (r / "config.json").write_text("[]"))],
        ["config.json: holds a list, not an object"],
    ),
    (
        "resume-config-field-of-wrong-type",
        lambda c: ["train", "--resume", _edited_run(c, lambda r: _set_config(r, epochs="ten"))],
        ["config.json: config: field epochs is 'ten', expected an integer"],
    ),
    (
        "sweep-summarize-empty-sweep-json",
        lambda c: ["sweep", "--summarize", str(_with_file(c, "sw/sweep.json", "{}"))],
        ["sweep.json: 'keys' is missing"],
    ),
    (
        "plot-metrics-accuracy-not-a-number",
        lambda c: [
            "plot",
            _edited_run(
                c,
                lambda r: (r / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_robust_acc": "high"}) + "\n"),
            ),
            "--out",
            str(c.tmp / "c.png"),
        ],
        ["metrics.jsonl: line 1: test_robust_acc is 'high'", "or null (not measured)"],
    ),
    (
        "export-eval-json-not-a-report",
        lambda c: ["export", c.ckpt, "--out", str(c.tmp / "x"), "--eval-json", str(c.run / "config.json")],
        ["eval_json: ", "'results' is missing"],
    ),
    (
        "export-eval-json-of-another-model",
        lambda c: [
            "export",
            c.ckpt,
            "--out",
            str(c.tmp / "x"),
            "--eval-json",
            c.write(
                "e.json", json.dumps({"results": {"n": 8, "natural": 0.5}, "config": {"model": "preact_resnet18"}})
            ),
        ],
        ["eval_json: ", "model 'preact_resnet18'", "is of model 'small_cnn'"],
    ),
    (
        "export-eval-json-missing",
        lambda c: ["export", c.ckpt, "--out", str(c.tmp / "x"), "--eval-json", str(c.tmp / "no.json")],
        ["eval_json: ", "no such file"],
    ),
    (
        "eval-checkpoint-config-is-a-list",
        lambda c: ["eval", c.checkpoint_with("bad.pt", whole=[])],
        ["checkpoint ", "its config: holds list"],
    ),
    (
        "eval-not-a-checkpoint",
        lambda c: ["eval", c.write("random.pt", bytes(range(7, 207))), "--out", str(c.tmp / "e.json")],
        ["random.pt: not an rwp-fast checkpoint", "not the zip archive torch.save writes", "first bytes: 07 08 09"],
    ),
    (
        "export-not-a-checkpoint",
        lambda c: ["export", c.write("random.pt", bytes(range(7, 207))), "--out", str(c.tmp / "x")],
        ["not an rwp-fast checkpoint", "not the zip archive"],
    ),
    (
        "eval-checkpoint-with-pickled-objects",
        lambda c: ["eval", c.pickled("obj.pt")],
        ["not an rwp-fast checkpoint", "objects that a weights-only load refuses", "pathlib"],
    ),
    (
        "bench-batch-size-0",
        lambda c: ["bench", "--device", "cpu", "--batch-size", "0", "--json", str(c.tmp / "b.json")],
        ["batch_size: must be an integer >= 1, got 0"],
    ),
    (
        "bench-batch-size-negative",
        lambda c: ["bench", "--device", "cpu", "--batch-size", "-3", "--json", str(c.tmp / "b.json")],
        ["batch_size: must be an integer >= 1, got -3"],
    ),
    (
        "train-one-class-dataset",
        lambda c: ["train", *TRAIN, "--dataset", "npz", "--data-dir", c.one_class_npz(), "--out-dir", str(c.tmp / "r")],
        ["dataset 'npz'", "hold 1 class(es)"],
    ),
    # ---- a checkpoint of another run: refused, naming both
    (
        "resume-last-pt-of-another-model",
        lambda c: ["train", "--resume", _edited_run(c, lambda r: _set_config(r, model="small_cnn_gn"))],
        ["resume: ", "model 'small_cnn' in last.pt but 'small_cnn_gn' in config.json"],
    ),
    (
        "resume-last-pt-of-another-dataset",
        lambda c: [
            "train",
            "--resume",
            _edited_run(c, lambda r: _set_config(r, dataset="synthetic", train_examples=0)),
        ],
        ["dataset 'digits' in last.pt but 'synthetic' in config.json"],
    ),
    (
        "resume-last-pt-ahead-of-metrics",
        lambda c: ["train", "--resume", _edited_run(c, lambda r: (r / "metrics.jsonl").write_text(""))],
        ["resume: ", "records 1 epoch(s) of metrics", "holds 0"],
    ),
    # ---- values that pass a range check but mean nothing
    (
        "train-momentum-1.5",
        lambda c: ["train", "--momentum", "1.5", "--out-dir", str(c.tmp / "r")],
        ["momentum: must be in [0, 1), got 1.5"],
    ),
    (
        "train-momentum-1",
        lambda c: ["train", "--momentum", "1", "--out-dir", str(c.tmp / "r")],
        ["momentum: must be in [0, 1)"],
    ),
    (
        "sweep-grid-points-share-a-directory",
        lambda c: ["sweep", "--grid", "data_dir=a/b,a-b", "--out-dir", str(c.tmp / "sw")],
        ["grid: the points", "both map to the run directory 'data_dir=a-b'"],
    ),
    ("backend-env-not-a-backend", lambda c: _backend_env(c, "fastest"), ["backend: RWP_FAST_BACKEND='fastest'"]),
    ("demo-backend-env-not-a-backend", lambda c: _backend_env(c, "fastest", "demo"), ["backend: RWP_FAST_BACKEND="]),
    (
        "eval-l2-checkpoint-with-fgsm",
        lambda c: ["eval", c.checkpoint_with("l2.pt", norm="l2", epsilon_255=128.0), "--attacks", "natural,fgsm,pgd20"],
        ["attacks: fgsm is defined for norm 'linf' only", "norm is 'l2'", "allowed: natural, fgm"],
    ),
    (
        "eval-linf-checkpoint-with-fgm",
        lambda c: ["eval", c.ckpt, "--attacks", "fgm", "--out", str(c.tmp / "e.json")],
        ["attacks: fgm is defined for norm 'l2' only"],
    ),
]
# argparse errors: one line with a pointer to --help, for every subcommand (one parser class, cli.Parser)
COMMANDS = ("train", "eval", "plot", "export", "sweep", "verify", "bench", "demo", "presets")
CASES += [
    (
        f"{cmd}-unknown-flag",
        lambda c, cmd=cmd: [cmd, "--no-such-flag"],
        [f"rwp-fast {cmd}: error:", f"(see rwp-fast {cmd} --help)"],
    )
    for cmd in COMMANDS
]
CASES += [
    (
        "train-not-an-integer",
        lambda c: ["train", "--epochs", "ten"],
        ["argument --epochs: invalid int value: 'ten'", "(see rwp-fast train --help)"],
    )
]


@pytest.mark.parametrize("build,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_line_with_nothing_written(tmp_path, tiny_run, capsys, monkeypatch, build, needles):
    ctx = Ctx(tiny_run, tmp_path, monkeypatch)
    argv = build(ctx)
    before = snapshot(tiny_run, tmp_path)
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse exits itself
        status = exc.code
    out, err = capsys.readouterr()
    assert status == EXIT_USER_ERROR, (status, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err and "weights_only" not in err and "http" not in err
    assert snapshot(tiny_run, tmp_path) == before  # nothing changed, nothing new


def test_a_good_output_path_still_works(tmp_path, tiny_run):
    """The other side of the table: a new directory is created, and an earlier output of the same kind
    is replaced."""
    assert main(["export", str(tiny_run / "last.pt"), "--out", str(tmp_path / "a" / "b")]) == 0
    assert {"model.pt", "model_card.json"} <= set(os.listdir(tmp_path / "a" / "b"))
    assert main(["export", str(tiny_run / "last.pt"), "--out", str(tmp_path / "a" / "b")]) == 0
    assert main(["plot", str(tiny_run), "--out", str(tmp_path / "c.png")]) == 0
    assert main(["plot", str(tiny_run), "--out", str(tmp_path / "c.png")]) == 0


def test_the_table_names_every_subcommand():
    """Every subcommand has cases in the table (a new subcommand needs its own)."""
    from rwp_fast.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    covered = {c[0].split("-")[0] for c in CASES}
    assert commands <= covered, commands - covered


@pytest.mark.skipif(
    not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and os.geteuid() != 0,
    reason="needs /sys, which refuses new files even to root",
)
def test_an_unwritable_directory_is_refused_before_any_work(tiny_run, capsys):
    import tempfile

    try:
        os.close(tempfile.mkstemp(dir="/sys")[0])
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    for argv, needle in (
        (["train", "--out-dir", "/sys/rwp-fast-run"], "out_dir: cannot write in '/sys'"),
        (["plot", str(tiny_run), "--out", "/sys/c.png"], "out: cannot write in '/sys'"),
        (["eval", str(tiny_run / "last.pt"), "--out", "/sys/e.json"], "out: cannot write in"),
    ):
        cli_helpers.one_line_error(capsys, argv, needle)
