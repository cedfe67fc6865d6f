"""``summary.png``: the robust-accuracy curves of every point and best/last/gap against the swept value."""

import math
import os
import statistics

from .grid import LSC_KEY, value_label
from .stats import read_rows, run_stats


def _axis(sweep):
    """(x key, x positions per point, tick labels or None, series key per point, x-axis label)."""
    key = sweep.keys[0] if sweep.keys else None
    xs = [p["values"].get(key) for p in sweep.points] if key else [0] * len(sweep.points)
    numeric = key not in (None, LSC_KEY) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 and math.isfinite(x) for x in xs)
    ticks = None
    if not numeric:
        order = []
        for x in xs:
            if x not in order:
                order.append(x)
        ticks = [value_label(key, x).split("=", 1)[-1] if key else "base" for x in order]
        xs = [order.index(x) for x in xs]
    series = [", ".join(value_label(k, p["values"][k]) for k in sweep.keys[1:]) for p in sweep.points]
    if key == LSC_KEY:
        label = "LSC range [p, q) of the loss (nats)"
    elif key in ("c_min", "lsc_low"):
        label = f"{key} (nats of per-example loss)"
    elif key in ("epsilon_255", "alpha_255", "epsilon", "alpha"):  # the old names, in a sweep.json of before
        label = f"{key.removesuffix('_255')} (/255)"
    else:
        label = key or ""
    return key, xs, ticks, series, label


def plot_summary(sweep, out_path):
    """summary.png: top, the robust-accuracy curves of every point, coloured by the swept value; bottom,
    best and last robust accuracy, and their gap, against the swept value (the shape of the paper's Fig. 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from ..train.plots import read_config, threat_title

    key, xs, ticks, series, xlabel = _axis(sweep)
    order = sorted(set(xs))
    cmap = plt.get_cmap("viridis")
    colour_of = {x: cmap(0.9 * i / max(len(order) - 1, 1)) for i, x in enumerate(order)}
    series_names = list(dict.fromkeys(series))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "P", "X"]
    style_of = {s: styles[i % len(styles)] for i, s in enumerate(series_names)}

    plt.rcParams.update({"font.size": 12})
    fig = plt.figure(figsize=(12, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.1, 1))
    ax_curve = fig.add_subplot(grid[0, :])
    ax_acc = fig.add_subplot(grid[1, 0])
    ax_gap = fig.add_subplot(grid[1, 1])

    configs = []
    stats = []   # per point: (x, series, best mean/std, last mean/std, gap mean/std)
    for point, x, s in zip(sweep.points, xs, series):
        curves, per_run = [], []
        for run in point["runs"]:
            d = os.path.join(sweep.directory, run["dir"])
            rows = read_rows(d)
            if not rows:
                continue
            configs.append(read_config(d))
            curves.append(([r["epoch"] for r in rows], [100 * r["test_robust_acc"] for r in rows]))
            per_run.append(run_stats(rows))
        if not curves:
            continue
        colour = colour_of[x]
        for epochs, acc in curves if len(curves) > 1 else []:
            ax_curve.plot(epochs, acc, color=colour, linestyle=style_of[s], alpha=0.3, linewidth=1)
        n = min(len(c[0]) for c in curves)
        mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
        label = point["label"]
        ax_curve.plot(curves[0][0][:n], mean, color=colour, linestyle=style_of[s], linewidth=2, label=label)

        def ms(col):
            vals = [r[col] for r in per_run]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
        stats.append((x, s, ms("best_robust"), ms("last_robust"), ms("gap")))

    for i, name in enumerate(series_names):
        pts = sorted((st for st in stats if st[1] == name), key=lambda st: st[0])
        if not pts:
            continue
        px = [p[0] for p in pts]
        suffix = f" ({name})" if name else ""
        ax_acc.errorbar(px, [p[2][0] for p in pts], yerr=[p[2][1] for p in pts], marker="D", capsize=3,
                        linestyle=style_of[name], color="tab:blue", label="best" + suffix)
        ax_acc.errorbar(px, [p[3][0] for p in pts], yerr=[p[3][1] for p in pts], marker="o", capsize=3,
                        linestyle=style_of[name], color="tab:red", label="last" + suffix,
                        markersize=10, markerfacecolor="none", markeredgewidth=2)  # a coinciding ◆ shows
        ax_gap.errorbar(px, [p[4][0] for p in pts], yerr=[p[4][1] for p in pts], marker=markers[i % len(markers)],
                        capsize=3, linestyle=style_of[name], color="0.25", label=name or "gap")

    steps = {c.get("eval_attack_steps") for c in configs if c}
    pgd = f"PGD-{steps.pop()}" if len(steps) == 1 else "PGD"
    ax_curve.set_xlabel("epoch")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_ylabel(f"test robust accuracy, {pgd} (%)")
    seeds = max(len(p["runs"]) for p in sweep.points)
    ax_curve.set_title("robust accuracy per epoch; colour: " + (xlabel.split(" (")[0] if key else "run")
                       + ("; thick: mean over seeds, thin: each seed" if seeds > 1 else ""), fontsize=12)
    ax_curve.legend(fontsize=9, loc="best", ncol=2 if len(sweep.points) > 6 else 1)
    for ax in (ax_acc, ax_gap):
        ax.set_xlabel(xlabel)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels(ticks, rotation=20 if sum(map(len, ticks)) > 40 else 0)
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel(f"test robust accuracy, {pgd} (%)")
    ax_acc.set_title("best (◆) and last (○) epoch", fontsize=12)
    ax_acc.legend(fontsize=9, loc="best")
    ax_gap.set_ylabel("best − last (percentage points)")
    ax_gap.set_title("robust-overfitting gap", fontsize=12)
    ax_gap.axhline(0, color="0.6", linewidth=0.8)
    if len(series_names) > 1:
        ax_gap.legend(fontsize=9, loc="best")
    title = threat_title(configs)
    if seeds > 1:
        title += f" · mean ± std over {seeds} seeds"
    fig.suptitle(title, fontsize=13)
    if len(series_names) > 1:   # the curves' line styles name the other swept fields
        ax_curve.add_artist(ax_curve.legend(fontsize=9, loc="best"))
        handles = [Line2D([], [], color="0.3", linestyle=style_of[s]) for s in series_names]
        ax_curve.legend(handles, series_names, fontsize=9, loc="lower center", title="line style")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    plt.rcParams.update(matplotlib.rcParamsDefault)
    return out_path
