"""Per-run numbers from a run's metrics.jsonl, shared by the summary table and the figure."""

import statistics


def read_rows(run_dir):
    from ..train.plots import read_metrics
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        return []


def run_stats(rows):
    """Per-run numbers of the summary, from its metrics rows (accuracies in %)."""
    acc = [100 * r["test_robust_acc"] for r in rows]
    ips = [r["images_per_second"] for r in rows if "images_per_second" in r]
    out = {"best_robust": max(acc), "last_robust": acc[-1], "gap": max(acc) - acc[-1],
           "natural_last": 100 * rows[-1].get("test_natural_acc", float("nan")),
           # probes per step, averaged over epochs (0 in AT epochs and warm-up epochs)
           "probes": statistics.fmean(r.get("rwp_steps_mean", 0.0) for r in rows),
           # median: the first epoch carries one-off costs (allocation, compilation)
           "img_s": statistics.median(ips) if ips else float("nan"),
           "epochs": len(rows)}
    ema = [100 * r["test_robust_acc_ema"] for r in rows if r.get("test_robust_acc_ema") is not None]
    if ema:
        out.update(best_robust_ema=max(ema), last_robust_ema=ema[-1])
    return out


STAT_COLUMNS = ("best_robust", "last_robust", "gap", "natural_last", "probes", "img_s", "best_robust_ema",
                "last_robust_ema")

