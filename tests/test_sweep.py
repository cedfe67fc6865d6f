"""rwp-fast sweep: grids, run directories, skip/resume on restart, summary.csv/.png, --parallel, bad input.

Every run here is tiny (synthetic data, 32 training images: one step per epoch, 1–2 epochs, PGD-1): the
whole file is meant to stay well under a minute on two CPU cores.
"""

import csv
import json
import math
import os

import pytest

from rwp_fast import cli, sweep
from rwp_fast.config import ConfigError, RunConfig
from rwp_fast.train import Trainer

TINY = ["--dataset", "synthetic", "--model", "small_cnn", "--train-examples", "32", "--eval-examples", "16",
        "--batch-size", "32", "--attack-steps", "1", "--eval-attack-steps", "1", "--perturb", "rwp",
        "--k2", "1", "--epsilon", "8", "--alpha", "8", "--lr", "0.05", "--lr-milestones", "1",
        "--device", "cpu", "--quiet"]
GRID_2X2 = ["--grid", "c_min=1.0,inf", "--grid", "gamma=0.01,0.02"]
NAMES_2X2 = ["c_min=1.0_gamma=0.01", "c_min=1.0_gamma=0.02", "c_min=inf_gamma=0.01", "c_min=inf_gamma=0.02"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_2x2_sweep_runs_dirs_csv_png_then_skips_finished_and_resumes_the_interrupted(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--epochs", "2", *GRID_2X2, "--out-dir", str(out)]

    # First start: the third run is killed (KeyboardInterrupt) in its second epoch, after its epoch-1
    # checkpoint; the first two finish.
    real_epoch = Trainer.train_epoch
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 6:   # runs 1 and 2: epochs 1–2 (calls 1–4); run 3: epoch 1 (call 5), killed in 2
            raise KeyboardInterrupt
        return real_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    third = out / NAMES_2X2[2]
    assert (out / NAMES_2X2[0] / "done.json").exists() and (out / NAMES_2X2[1] / "done.json").exists()
    assert (third / "last.pt").exists() and not (third / "done.json").exists()
    assert not (out / NAMES_2X2[3]).exists()
    finished_mtime = os.path.getmtime(out / NAMES_2X2[0] / "last.pt")
    capsys.readouterr()

    # Second start: finished runs skipped, the interrupted one resumed after epoch 1, the last one new.
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert f"{NAMES_2X2[0]}: done, skipped" in log and f"{NAMES_2X2[1]}: done, skipped" in log
    assert f"{NAMES_2X2[2]}: resume" in log and "resuming" in log and "after epoch 1 of 2" in log
    assert f"{NAMES_2X2[3]}: new" in log
    assert os.path.getmtime(out / NAMES_2X2[0] / "last.pt") == finished_mtime
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES_2X2
    for name in NAMES_2X2:
        cfg = RunConfig.from_dict(json.load(open(out / name / "config.json"))["config"])
        assert [r["epoch"] for r in metrics(out / name)] == [1, 2]   # the resumed run has no duplicate
        assert cfg.c_min == (1.0 if "c_min=1.0" in name else math.inf)
        assert cfg.gamma == (0.01 if "gamma=0.01" in name else 0.02)

    rows = read_csv(out / "summary.csv")
    assert [r["point"] for r in rows] == ["c_min=1.0, gamma=0.01", "c_min=1.0, gamma=0.02",
                                          "c_min=inf, gamma=0.01", "c_min=inf, gamma=0.02"]
    for row, name in zip(rows, NAMES_2X2):
        m = metrics(out / name)
        best, last = max(100 * r["test_robust_acc"] for r in m), 100 * m[-1]["test_robust_acc"]
        assert float(row["best_robust"]) == pytest.approx(best, abs=1e-4)
        assert float(row["last_robust"]) == pytest.approx(last, abs=1e-4)
        assert float(row["gap"]) == pytest.approx(best - last, abs=1e-4)
        assert float(row["probes"]) == pytest.approx(sum(r["rwp_steps_mean"] for r in m) / 2, abs=1e-4)
        assert row["seeds"] == "1" and row["epochs"] == "2"
    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "| c_min=inf, gamma=0.02 |" in log   # the printed table


def test_seeds_in_parallel_children_and_mean_std_summary(tmp_path):
    out = tmp_path / "seeds"
    assert cli.main(["sweep", *TINY, "--epochs", "1", "--grid", "k2=2", "--seeds", "0,1", "--parallel", "2",
                     "--out-dir", str(out)]) == 0
    names = ["k2=2_seed=0", "k2=2_seed=1"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    for seed, name in enumerate(names):
        assert (out / name / "done.json").exists() and (out / name / "train.log").exists()
        assert json.load(open(out / name / "config.json"))["config"]["seed"] == seed
    (row,) = read_csv(out / "summary.csv")
    accs = [100 * metrics(out / n)[-1]["test_robust_acc"] for n in names]
    assert row["seeds"] == "2"
    assert float(row["last_robust"]) == pytest.approx(sum(accs) / 2, abs=1e-4)
    assert float(row["last_robust_std"]) == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2), abs=1e-4)
    # --summarize on its own rewrites the same table
    os.remove(out / "summary.csv")
    assert cli.main(["sweep", "--summarize", str(out)]) == 0
    assert read_csv(out / "summary.csv") == [row]
    # one seed's run as an rwp-fast before the stratified subsets wrote it: the summary says the two seeds
    # were evaluated on different images (the same subsets say nothing)
    said = []
    sweep.summarize(str(out), log=said.append)
    assert not any("different test subsets" in s for s in said)
    path = out / names[1] / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "eval_subsets"}))
    said = []
    sweep.summarize(str(out), log=said.append)
    (warning,) = [s for s in said if "different test subsets" in s]
    assert names[0] in warning and f"unrecorded (an rwp-fast older than the stratified subsets: the first N " \
        f"images): {names[1]}" in warning


def test_points_zip_lsc_ranges_and_names(tmp_path):
    base = RunConfig(perturb="rwp")
    s = sweep.build_sweep(base, str(tmp_path), [("c_min", [1.0, 2.0]), ("k2", [1, 5])], zip_=True)
    assert [r["dir"] for _, r in s.runs()] == ["c_min=1.0_k2=1", "c_min=2.0_k2=5"]
    s = sweep.build_sweep(base, str(tmp_path), [("k2", [1, 5])], lsc_ranges=sweep.parse_lsc_ranges("0:0.5,2:inf"),
                          seeds=[3])
    dirs = [r["dir"] for _, r in s.runs()]
    assert dirs == ["lsc=0.0-0.5_k2=1_seed=3", "lsc=0.0-0.5_k2=5_seed=3", "lsc=2.0-inf_k2=1_seed=3",
                    "lsc=2.0-inf_k2=5_seed=3"]
    cfg = s.configs[dirs[2]]
    assert (cfg.lsc_low, cfg.c_min, cfg.k2, cfg.seed) == (2.0, math.inf, 1, 3)
    assert cfg.out_dir == os.path.join(str(tmp_path), dirs[2])
    assert sweep.parse_grid("lr_milestones=100/150,50") == ("lr_milestones", [(100, 150), (50,)])
    assert sweep.parse_grid("nesterov=true,false") == ("nesterov", [True, False])


@pytest.mark.parametrize("argv, message", [
    (["--grid", "c_mni=1,2"], "grid: 'c_mni' is not a RunConfig field; allowed: dataset"),
    (["--grid", "c_min"], "grid: 'c_min' is not FIELD=V1,V2"),
    (["--grid", "k2=1,x"], "grid: k2='x' is not an integer"),
    (["--grid", "k2=1,2", "--grid", "c_min=1", "--zip"], "zip: --zip pairs the grids element by element"),
    (["--lsc-ranges", "1:0.5"], "lsc_ranges: '1:0.5' is not P:Q with 0 <= P <= Q"),
    (["--lsc-ranges", "0:1", "--grid", "c_min=1,2"], "grid: --lsc-ranges sets lsc_low and c_min"),
    (["--lsc-ranges", "0:1", "--perturb", "awp"], "lsc_ranges: the LSC range shapes the RWP perturbation"),
    (["--grid", "k2=1", "--seeds", "0,x"], "seeds: '0,x' is not a comma-separated list"),
    (["--grid", "k2=1", "--parallel", "0"], "parallel: must be an integer >= 1"),
    (["--perturb", "rwp"], "grid: nothing to sweep"),
    (["--grid", "lsc_low=3", "--c-min", "2"], "lsc_low: the LSC range [lsc_low, c_min) needs lsc_low <= c_min"),
])
def test_bad_input_is_one_line_naming_the_argument(tmp_path, capsys, argv, message):
    argv = ["sweep", "--perturb", "rwp", "--out-dir", str(tmp_path / "s"), *argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_run_directory_of_another_config_is_refused(tmp_path, capsys):
    cfg = RunConfig(**{"perturb": "rwp", "out_dir": str(tmp_path / "s" / "k2=1")})
    os.makedirs(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({"config": cfg.replace(gamma=0.5).to_dict()}, f)
    with pytest.raises(ConfigError, match=r"out_dir: .*k2=1 holds a run of another configuration .*gamma"):
        sweep.run_status(cfg)
    assert cli.main(["sweep", "--perturb", "rwp", "--grid", "k2=1", "--out-dir", str(tmp_path / "s")]) == 2
    assert "holds a run of another configuration" in capsys.readouterr().err


def test_a_run_saved_with_another_compile_mode_is_the_same_run(tmp_path):
    """compile_mode is a speed setting: a run saved with cuda-graphs is the same run under default."""
    cfg = RunConfig(**{"perturb": "rwp", "out_dir": str(tmp_path / "s" / "k2=1")})
    os.makedirs(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({"config": cfg.replace(compile_mode="cuda-graphs").to_dict()}, f)
    sweep.run_status(cfg)  # no ConfigError


def test_a_grid_over_a_renamed_field_takes_the_flag_name_and_keeps_the_directory_names():
    """--grid epsilon=... as --epsilon: it sets epsilon_255, and the run directories are named epsilon=...
    as before the rename, so a sweep started then is still resumed."""
    assert sweep.parse_grid("epsilon=4,8") == ("epsilon_255", [4.0, 8.0])
    assert sweep.parse_grid("alpha_255=1") == ("alpha_255", [1.0])
    assert sweep.run_name({"epsilon_255": 4.0}, seed=1) == "epsilon=4.0_seed=1"
    assert sweep.value_label("epsilon_255", 4.0) == "epsilon=4.0"


def test_mixed_subset_warning_only_where_the_sweep_did_not_ask_for_other_images(tmp_path):
    """An old run (no eval_subsets) with eval_examples 0 saw the whole test set, as a new whole-set run
    did: no warning. A grid over eval_examples compares other subsets on purpose: only its seeds must agree."""
    from rwp_fast.sweep import summary

    def run(name, eval_examples, record):
        os.makedirs(tmp_path / name)
        saved = {"config": {"eval_examples": eval_examples}}
        if record is not None:
            saved["eval_subsets"] = {"test": record}
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
        return summary._test_subset(str(tmp_path / name))

    whole_old = run("a", 0, None)
    whole_new = run("b", 0, {"n": 10000, "of": 10000, "seed": None, "stratified": False})
    first_n = run("c", 100, None)
    strat = run("d", 100, {"n": 100, "of": 10000, "seed": 0, "stratified": True})
    assert whole_old == whole_new == summary.WHOLE_TEST_SET and first_n == summary.UNRECORDED != strat
    said = []
    summary._warn_on_mixed_subsets("s", [], [{whole_old: ["a"]}, {whole_new: ["b"]}], said.append)
    assert said == []
    # swept eval_examples: points may differ, the seeds of one point may not
    summary._warn_on_mixed_subsets("s", ["eval_examples"], [{whole_new: ["b"]}, {strat: ["d"]}], said.append)
    assert said == []
    summary._warn_on_mixed_subsets("s", ["eval_examples"], [{whole_new: ["b"]}, {strat: ["d"], first_n: ["c"]}],
                                   said.append)
    assert len(said) == 1 and "d" in said[0] and "c" in said[0]
    summary._warn_on_mixed_subsets("s", ["gamma"], [{whole_new: ["b"]}, {strat: ["d"]}], said.append)
    assert len(said) == 2
