"""Per-run numbers from a run's metrics.jsonl, shared by the summary table and the figure. A null value
in a row is "not measured" (rwp_fast/readers.py): it is left out of every number, never read as 0."""

import statistics

from ..readers import measured, read_metrics


def read_rows(run_dir):
    """The run's checked metrics rows that have a measured test_robust_acc; [] for a run without any."""
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        return []
    return [r for r in rows if r["test_robust_acc"] is not None]


def _pct(value):
    return None if value is None else 100 * value


def run_stats(rows):
    """Per-run numbers of the summary, from its metrics rows with a measured robust accuracy (read_rows;
    accuracies in %)."""
    acc = [100 * v for _, v in measured(rows)]
    ips = [v for _, v in measured(rows, "images_per_second")]
    probes = [v for _, v in measured(rows, "rwp_steps_mean")]
    out = {"best_robust": max(acc), "last_robust": acc[-1], "gap": max(acc) - acc[-1],
           "natural_last": _pct(rows[-1].get("test_natural_acc")),
           # probes per step, averaged over epochs (0 in AT epochs and warm-up epochs)
           "probes": statistics.fmean(probes) if probes else None,
           # median: the first epoch carries one-off costs (allocation, compilation)
           "img_s": statistics.median(ips) if ips else None,
           "epochs": len(rows)}
    ema = [100 * v for _, v in measured(rows, "test_robust_acc_ema")]
    if ema:
        out.update(best_robust_ema=max(ema), last_robust_ema=ema[-1])
    return out


STAT_COLUMNS = ("best_robust", "last_robust", "gap", "natural_last", "probes", "img_s", "best_robust_ema",
                "last_robust_ema")

