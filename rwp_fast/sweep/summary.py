"""``summary.csv`` and the printed table of a sweep directory (mean ± sample std over seeds), and
``summary.png`` through ``plot.py``."""

import csv
import json
import os
import statistics

from .._fs import atomic_write, check_output_dir
from ..config import ConfigError
from ..readers import read_run_config
from .grid import LSC_KEY, NOT_IDENTITY, SWEEP_FILE, Sweep, format_value, load_sweep_file, value_label
from .plot import plot_summary
from .stats import STAT_COLUMNS, read_rows, run_stats

SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
SUMMARY_OUTPUTS = [(SUMMARY_CSV, "summary_csv"), (SUMMARY_PNG, "figure")]  # what --summarize writes (_fs kinds)


def _infer_sweep(sweep_dir):
    """A Sweep for a directory of runs without sweep.json: the swept keys are the config fields that
    differ between the runs (seed apart: runs that differ only in seed are seeds of one point)."""
    runs = sorted(d for d in os.listdir(sweep_dir) if os.path.isfile(os.path.join(sweep_dir, d, "metrics.jsonl")))
    configs = {d: (read_run_config(os.path.join(sweep_dir, d)) or {}).get("config", {}) for d in runs}
    fields = sorted({k for c in configs.values() for k in c} - set(NOT_IDENTITY) - {"seed"})
    keys = [k for k in fields if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
    points = {}
    for d in runs:
        values = {k: tuple(configs[d].get(k)) if isinstance(configs[d].get(k), list) else configs[d].get(k)
                  for k in keys}
        key = json.dumps(values, sort_keys=True, default=str)
        label = ", ".join(value_label(k, v) for k, v in values.items()) or "base"
        points.setdefault(key, {"values": values, "label": label, "runs": []})["runs"].append(
            {"seed": configs[d].get("seed"), "dir": d})
    return Sweep(sweep_dir, keys, list(points.values()), {})


def summarize(sweep_dir, log=print):
    """Write summary.csv and summary.png for the runs of `sweep_dir` and print the table; returns the rows."""
    if not os.path.isdir(sweep_dir):
        raise ConfigError(f"summarize: {sweep_dir!r} is not a directory; allowed: a sweep directory")
    check_output_dir(sweep_dir, "summarize", SUMMARY_OUTPUTS)   # before reading: nothing half written
    if os.path.isfile(os.path.join(sweep_dir, SWEEP_FILE)):
        sweep = load_sweep_file(sweep_dir)
    else:
        sweep = _infer_sweep(sweep_dir)
    if not sweep.points:
        raise ConfigError(f"summarize: {sweep_dir} holds no sweep.json and no run directories with metrics.jsonl")
    rows, subsets = [], []
    for point in sweep.points:
        per_run, subsets_here = [], {}
        for run in point["runs"]:
            metrics = read_rows(os.path.join(sweep_dir, run["dir"]))
            if metrics:
                per_run.append(run_stats(metrics))
                subsets_here.setdefault(_test_subset(os.path.join(sweep_dir, run["dir"])), []).append(run["dir"])
        subsets.append(subsets_here)
        row = {"point": point["label"], **{k: format_value(v) for k, v in point["values"].items()},
               "seeds": len(per_run), "runs": len(point["runs"])}
        for col in STAT_COLUMNS:
            vals = [r[col] for r in per_run if r.get(col) is not None]
            row[col] = statistics.fmean(vals) if vals else None
            row[col + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        row["epochs"] = min((r["epochs"] for r in per_run), default=0)
        rows.append(row)
    _warn_on_mixed_subsets(sweep_dir, sweep.keys, subsets, log)
    _write_csv(os.path.join(sweep_dir, SUMMARY_CSV), rows, sweep.keys)
    log(summary_table(rows, seeds=any(len(p["runs"]) > 1 for p in sweep.points)))
    if any(r["seeds"] for r in rows):
        png = plot_summary(sweep, os.path.join(sweep_dir, SUMMARY_PNG))
        log(f"\nwrote {os.path.join(sweep_dir, SUMMARY_CSV)} and {png}")
    return rows


# Swept fields that choose the test images themselves: across such points other subsets are what was asked.
SUBSET_FIELDS = ("dataset", "eval_examples", "subset_seed")
WHOLE_TEST_SET = "the whole test set"
UNRECORDED = "unrecorded (an rwp-fast older than the stratified subsets: the first N images)"


def _test_subset(run_dir):
    """The test subset a run's config.json records, as text; a run from before the stratified subsets
    records none (it evaluated the first N images, or the whole set with eval_examples 0)."""
    saved = read_run_config(run_dir)   # shape-checked (rwp_fast/readers.py); None without one
    if saved is None:
        return "no config.json"
    record = (saved.get("eval_subsets") or {}).get("test")
    if not isinstance(record, dict):
        old_n = (saved.get("config") or {}).get("eval_examples", 1) or 0
        return WHOLE_TEST_SET if old_n <= 0 else UNRECORDED
    return WHOLE_TEST_SET if not record.get("stratified") else json.dumps(record, sort_keys=True)


def _warn_on_mixed_subsets(sweep_dir, keys, subsets, log):
    """subsets: per point, {subset: [run dirs]}. The seeds of one point must share one; so must all
    points unless the sweep varies a SUBSET_FIELDS field. The table still comes: the user is told what
    its rows compare, not refused."""
    if any(k in SUBSET_FIELDS for k in keys):
        groups = [g for g in subsets if len(g) > 1]
    else:
        merged = {}
        for g in subsets:
            for subset, dirs in g.items():
                merged.setdefault(subset, []).extend(dirs)
        groups = [merged] if len(merged) > 1 else []
    for g in groups:
        text = "; ".join(f"{subset}: {', '.join(dirs)}" for subset, dirs in g.items())
        log(f"warning: {sweep_dir}: runs evaluated on different test subsets, so their accuracies are on "
            f"different images ({text})")


def _write_csv(path, rows, keys):
    columns = ["point", *[("lsc" if k == LSC_KEY else k) for k in keys], "seeds", "runs", "epochs"]
    for col in STAT_COLUMNS:
        if any(r[col] is not None for r in rows):
            columns += [col, col + "_std"]

    def write(f):
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            r = {**r, "lsc": r.get(LSC_KEY)}
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c])
                        for c in columns])
    atomic_write(path, write, mode="w")


def _cell(row, col, digits=2):
    mean, std = row[col], row[col + "_std"]
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def summary_table(rows, seeds=False):
    ema = any(r["best_robust_ema"] is not None for r in rows)
    head = ["point", "best robust (%)", "last robust (%)", "gap (pp)", "natural, last (%)", "probes/step",
            "img/s"] + (["EMA best/last (%)"] if ema else []) + (["seeds"] if seeds else []) + ["epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["point"], _cell(r, "best_robust"), _cell(r, "last_robust"), _cell(r, "gap"),
                 _cell(r, "natural_last"), _cell(r, "probes"), _cell(r, "img_s", 0)]
        if ema:
            cells.append(f"{_cell(r, 'best_robust_ema')} / {_cell(r, 'last_robust_ema')}")
        if seeds:
            cells.append(f"{r['seeds']}/{r['runs']}")
        cells.append(str(r["epochs"]))
        lines.append("| " + " | ".join(cells) + " |")
    note = "best/last: PGD test robust accuracy; gap = best − last (robust overfitting), percentage points"
    if seeds:
        note += "; mean ± sample std over seeds"
    return "\n".join(lines) + "\n" + note

