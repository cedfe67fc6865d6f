"""Learning curves from metrics.jsonl, in the style of the paper's Fig. 2(c).

Left: test robust accuracy (PGD-k) per epoch, one line per run; the best epoch is marked with a diamond
and the last with a circle. Runs whose best (or last) points coincide would hide each other's markers,
so the markers nest: the first run's are the largest and hollow, each later run's smaller,
and the legend states every run's best and last value. Right: the fraction of the batch inside the
LSC mask [p, q) at the first RWP probe, per epoch, for the runs that have a mask (RWP); runs without
one (plain AT, AWP) are not drawn there but named in the panel, since a 0% or 100% line would be a
mask that does not exist. The title names the data, the model and the threat model. An epoch whose
test_robust_acc is null (not measured) is left out of its curve, never drawn as 0; a run with no
measured epoch is not drawn.
"""

import os

from ..readers import read_metrics, read_run_config


def read_config(run_dir):
    """The run's config dict from config.json (checked by readers.read_run_config), or None without one."""
    info = read_run_config(run_dir)
    return None if info is None else info["config"]


def run_label(run_dir, config=None):
    c = config if config is not None else read_config(run_dir)
    try:
        return f"{c['method'].upper()}-{c['perturb'].upper()}" if c["perturb"] != "none" else c["method"].upper()
    except (KeyError, TypeError, AttributeError):
        return os.path.basename(os.path.normpath(run_dir))


def threat_title(configs):
    """'digits · small_cnn · L∞ ε = 32/255 · PGD-20 test' from the runs' configs (values that differ
    between runs are joined with '/'; unknown ones are left out)."""
    def values(key, fmt=str):
        seen = []
        for c in configs:
            if c and key in c and fmt(c[key]) not in seen:
                seen.append(fmt(c[key]))
        return "/".join(seen)

    norm = values("norm", lambda n: {"linf": "L∞", "l2": "L2"}.get(n, n))
    eps = values("epsilon_255", lambda e: f"{e:g}/255")
    steps = values("eval_attack_steps")
    parts = [values("dataset"), values("model"), f"{norm} ε = {eps}" if eps else norm,
             f"PGD-{steps} test" if steps else ""]
    return " · ".join(p for p in parts if p)


# Nested markers: run i is drawn at size BASE − i·STEP (never below MIN), hollow except the
# smallest, and later (smaller) runs on top, so up to three coinciding markers stay visible.
BEST_BASE, LAST_BASE, MARKER_STEP, MARKER_MIN = 17, 13, 5, 4


def plot_runs(run_dirs, out_path, labels=None):
    """Draw the curves of every run into one PNG at out_path; returns out_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_mask) = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax in (ax_acc, ax_mask):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    configs, unmasked, drawn = [], [], 0
    # the epochs with a measured robust accuracy (null: not measured, drawn as nothing rather than as 0)
    runs = [(i, d, [r for r in read_metrics(d) if r["test_robust_acc"] is not None]) for i, d in enumerate(run_dirs)]
    runs = [(i, d, rows) for i, d, rows in runs if rows]
    last_run = len(runs) - 1
    for k, (i, run_dir, rows) in enumerate(runs):
        config = read_config(run_dir)
        configs.append(config)
        label = labels[i] if labels else run_label(run_dir, config)
        epochs = [r["epoch"] for r in rows]
        acc = [100 * r["test_robust_acc"] for r in rows]
        best = max(range(len(acc)), key=acc.__getitem__)
        (line,) = ax_acc.plot(epochs, acc, zorder=2,
                              label=f"{label}: best {acc[best]:.2f}% (epoch {epochs[best]}), last {acc[-1]:.2f}%")
        color = line.get_color()
        hollow = k < last_run
        # circles above every diamond: a run whose best epoch is its last shows both markers
        for marker, base, index, z in (("D", BEST_BASE, best, 3), ("o", LAST_BASE, -1, 10)):
            size = max(base - MARKER_STEP * k, MARKER_MIN)
            ax_acc.plot(epochs[index], acc[index], marker, markersize=size, color=color, zorder=z + k,
                        markerfacecolor="none" if hollow else color, markeredgewidth=2)
        masked = config.get("perturb") == "rwp" if config else any(r.get("lsc_mask_fraction") for r in rows)
        if masked:
            frac = [100 * r["lsc_mask_fraction"][0] if r.get("lsc_mask_fraction") else float("nan")
                    for r in rows]
            ax_mask.plot(epochs, frac, label=label, color=color)
            drawn += 1
        else:
            unmasked.append(label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test robust accuracy (%)")
    ax_acc.set_title("robust accuracy (◆ best, ○ last; coinciding markers nest)", fontsize=10)
    # below the axes: a legend inside would cover curves or markers somewhere
    ax_acc.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax_mask.set_xlabel("epoch")
    ax_mask.set_ylabel("examples with loss in [p, q) at probe 1 (%)")
    ax_mask.set_title("LSC mask fraction (runs with a mask)", fontsize=10)
    ax_mask.set_ylim(-2, 102)
    if drawn:
        ax_mask.legend(fontsize=8, loc="best")
    if unmasked:
        ax_mask.text(0.02, 0.97, "no mask (not drawn): " + ", ".join(unmasked), transform=ax_mask.transAxes,
                     va="top", fontsize=8, color="0.3")
    title = threat_title(configs)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
