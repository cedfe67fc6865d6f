"""Learning curves from metrics.jsonl, in the style of the paper's Fig. 2(c).

Left: test robust accuracy (PGD-20) per epoch, one line per run, best epoch marked with a star and the
last with a circle. Right: the LSC diagnostics, the fraction of the batch inside the mask at the first
RWP probe, per epoch (0 for runs without RWP, whose mask is all-ones or absent).
"""

import json
import os


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run_dir: {run_dir} has no metrics.jsonl; is it an rwp-fast run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_label(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            c = json.load(f)["config"]
        return f"{c['method'].upper()}-{c['perturb'].upper()}" if c["perturb"] != "none" else c["method"].upper()
    except (OSError, KeyError, ValueError):
        return os.path.basename(os.path.normpath(run_dir))


def plot_runs(run_dirs, out_path, labels=None):
    """Draw the curves of every run into one PNG at out_path; returns out_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mask) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        if not rows:
            continue
        label = labels[i] if labels else run_label(run_dir)
        epochs = [r["epoch"] for r in rows]
        acc = [100 * r["test_robust_acc"] for r in rows]
        (line,) = ax_acc.plot(epochs, acc, label=label)
        best = max(range(len(acc)), key=acc.__getitem__)
        ax_acc.plot(epochs[best], acc[best], "*", color=line.get_color(), markersize=12)
        ax_acc.plot(epochs[-1], acc[-1], "o", color=line.get_color(), markersize=6)
        frac = [100 * (r["lsc_mask_fraction"][0] if r.get("lsc_mask_fraction") else 0.0) for r in rows]
        ax_mask.plot(epochs, frac, label=label, color=line.get_color())
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test robust accuracy, PGD-20 (%)")
    ax_acc.set_title("robust accuracy (★ best, ● last)")
    ax_acc.legend()
    ax_mask.set_xlabel("epoch")
    ax_mask.set_ylabel("examples with loss in [p, q) at probe 1 (%)")
    ax_mask.set_title("LSC mask fraction")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
