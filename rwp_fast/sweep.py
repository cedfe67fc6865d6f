"""``rwp-fast sweep``: run a grid of ordinary runs, skip what is finished, summarise it as a table and a figure.

    rwp-fast sweep --preset P --grid "c_min=1.0,1.5,1.7,2.0" --grid "k2=1,5,10" --out-dir runs/sweep
    rwp-fast sweep --preset P --lsc-ranges "0:0.5,0.5:1,1:1.5,1.5:2,2:inf" --seeds 0,1,2
    rwp-fast sweep --summarize runs/sweep

* ``--grid FIELD=V1,V2,...`` sweeps any RunConfig field (repeat the flag for more fields); the points are
  the product of the grids, or with ``--zip`` the grids taken element by element (equal lengths).
  Tuple fields take their elements joined by '/', e.g. ``lr_milestones=100/150,50/75``.
* ``--lsc-ranges "p:q,..."`` sets ``lsc_low = p`` and ``c_min = q`` together: the LSC-range analysis of
  the paper's Fig. 1 (the perturbation is built only from the adversarial examples with loss in [p, q)).
* ``--seeds 0,1,2`` repeats every point once per seed.

Each (point, seed) is an ordinary run directory under the sweep directory, named after its values
(``c_min=1.5_k2=10_seed=0``; an LSC range is ``lsc=0.5-1.0``), so ``rwp-fast train --resume``,
``eval`` and ``plot`` work on it. ``sweep.json`` lists the points; a finished run gets ``done.json``.
Started again, a sweep skips finished runs, resumes an interrupted one from its last.pt, and refuses a
directory that holds a run of another configuration.

Runs go one after another in this process. ``--parallel N`` runs N at once as child processes (log in
``RUN/train.log``): one per GPU, round robin, when there are several; on a CPU-only machine only when
N > 1 is given, with the cores split between them (OMP threads = cores // N).

When the runs are done (or with ``--summarize DIR`` at any time) it writes ``summary.csv``, prints one
table (best and last PGD test robust accuracy, their difference: the robust-overfitting gap, natural
accuracy, mean RWP probes per step, images/s; mean ± sample std over seeds) and draws ``summary.png``.
"""

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time

from .config import ConfigError, RunConfig

SWEEP_FILE = "sweep.json"
DONE_FILE = "done.json"
POINT_FILE = "point.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
LSC_KEY = "lsc_range"                 # the pseudo-field of --lsc-ranges: (lsc_low, c_min)
# Not part of a run's identity: a finished run with other values here is still the same run. compile_mode
# is a speed setting whose modes the tests hold equal to the reference.
NOT_IDENTITY = ("out_dir", "quiet", "device", "compile_mode")
# The LSC-range analysis of `rwp-fast demo --lsc-analysis`: the paper's ranges (SPEC.md, Fig. 1), in nats.
DEMO_LSC_RANGES = "0:0.5,0.5:1,1:1.5,1.5:2,2:inf"


# ------------------------------------------------------------------------------------------ parsing
def _fields():
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}


def parse_value(name, text):
    """`text` as a value of RunConfig field `name` (typed by the field's default)."""
    default = _fields()[name]
    text = text.strip()
    try:
        if isinstance(default, bool) or name in ("compile", "channels_last"):
            if text.lower() in ("none", "auto") and default is None:
                return None
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split("/") if v != "")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        kind = {bool: "true or false", tuple: "integers joined by '/' (e.g. 100/150)", int: "an integer",
                float: "a number"}.get(type(default) if default is not None else bool, "a value")
        raise ConfigError(f"grid: {name}={text!r} is not {kind}") from None


def parse_grid(spec):
    """'field=v1,v2' -> (field, [values]); a ConfigError naming --grid and the allowed fields."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    fields = [n for n in _fields() if n not in NOT_IDENTITY]
    if not sep or not values.strip():
        raise ConfigError(f"grid: {spec!r} is not FIELD=V1,V2,...; e.g. --grid c_min=1.0,1.5,1.7")
    if name not in fields:
        raise ConfigError(f"grid: {name!r} is not a RunConfig field; allowed: {', '.join(fields)}")
    parsed = [parse_value(name, v) for v in values.split(",") if v.strip()]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"grid: {name} lists a value twice ({values})")
    return name, parsed


def parse_lsc_ranges(text):
    """'0:0.5,2:inf' -> [(0.0, 0.5), (2.0, inf)]; each p <= q, p finite."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        p, sep, q = part.partition(":")
        try:
            p, q = float(p), float(q)
        except ValueError:
            p = q = None
        if not sep or p is None or math.isnan(p) or math.isnan(q) or not math.isfinite(p) or p < 0 or q < p:
            raise ConfigError(f"lsc_ranges: {part!r} is not P:Q with 0 <= P <= Q (Q may be inf), in nats; "
                              f"e.g. {DEMO_LSC_RANGES}")
        out.append((p, q))
    if not out:
        raise ConfigError(f"lsc_ranges: no range in {text!r}; e.g. {DEMO_LSC_RANGES}")
    return out


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {text!r} is not a comma-separated list of distinct integers >= 0, e.g. 0,1,2")
    return seeds


# ------------------------------------------------------------------------------------------ points
def format_value(value):
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]!r}-{value[1]!r}"      # an LSC range
    if isinstance(value, tuple):
        return "/".join(map(str, value)) or "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def value_label(key, value):
    """Human form of one swept value: 'c_min=1.5', 'LSC [0.5, 1.0)'."""
    if key == LSC_KEY:
        return f"[{value[0]:g}, {'∞' if value[1] == math.inf else f'{value[1]:g}'})"
    return f"{key}={format_value(value)}"


def run_name(values, seed=None):
    parts = [("lsc" if k == LSC_KEY else k) + "=" + format_value(v) for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    name = "_".join(parts) or "base"
    return name.replace(os.sep, "-").replace(" ", "")


def expand_points(grids, zip_=False, lsc_ranges=None):
    """[{key: value}] in sweep order: the LSC ranges (if any) outermost, then the grids."""
    keys = [name for name, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"grid: a field is given twice ({', '.join(keys)})")
    if lsc_ranges and {"lsc_low", "c_min"} & set(keys):
        raise ConfigError("grid: --lsc-ranges sets lsc_low and c_min; do not also --grid them")
    if zip_ and grids:
        lengths = {name: len(values) for name, values in grids}
        if len(set(lengths.values())) != 1:
            raise ConfigError("zip: --zip pairs the grids element by element and needs equal lengths, got "
                              + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        combos = [tuple(values[i] for _, values in grids) for i in range(len(grids[0][1]))]
    else:
        combos = list(itertools.product(*[values for _, values in grids]))
    points = []
    for lsc in (lsc_ranges or [None]):
        for combo in combos:
            point = {LSC_KEY: lsc} if lsc is not None else {}
            point.update(zip(keys, combo))
            points.append(point)
    return points


def point_config(base, values, seed, sweep_dir, with_seed):
    changes = {k: v for k, v in values.items() if k != LSC_KEY}
    if LSC_KEY in values:
        changes["lsc_low"], changes["c_min"] = values[LSC_KEY]
    if seed is not None:
        changes["seed"] = seed
    name = run_name(values, seed if with_seed else None)
    cfg = base.replace(**changes, out_dir=os.path.join(sweep_dir, name))
    try:
        return name, cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (sweep point {name})") from None


@dataclasses.dataclass
class Sweep:
    directory: str
    keys: list            # swept keys, in order (LSC_KEY first when given)
    points: list          # [{"values": {key: value}, "label": str, "runs": [{"seed": s, "dir": name}]}]
    configs: dict         # run dir name -> RunConfig (only when built from arguments)

    def runs(self):
        return [(p, r) for p in self.points for r in p["runs"]]


def build_sweep(base, sweep_dir, grids=(), zip_=False, seeds=None, lsc_ranges=None):
    if lsc_ranges and base.perturb != "rwp":
        raise ConfigError(f"lsc_ranges: the LSC range shapes the RWP perturbation; the base config has "
                          f"perturb {base.perturb!r} (allowed with --lsc-ranges: rwp; e.g. --perturb rwp or "
                          "a *-rwp preset)")
    values = expand_points(list(grids), zip_, lsc_ranges)
    keys = list(values[0])
    points, configs = [], {}
    for v in values:
        runs = []
        for seed in (seeds or [None]):
            name, cfg = point_config(base, v, seed, sweep_dir, with_seed=seeds is not None)
            runs.append({"seed": cfg.seed, "dir": name})
            configs[name] = cfg
        label = ", ".join(value_label(k, x) for k, x in v.items()) or "base"
        points.append({"values": v, "label": label, "runs": runs})
    return Sweep(sweep_dir, keys, points, configs)


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def save_sweep_file(sweep):
    data = {"keys": sweep.keys,
            "points": [{"values": {k: _json_value(v) for k, v in p["values"].items()}, "label": p["label"],
                        "runs": p["runs"]} for p in sweep.points]}
    path = os.path.join(sweep.directory, SWEEP_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)   # inf is written as Infinity, which json.load reads back
    os.replace(tmp, path)


def load_sweep_file(sweep_dir):
    with open(os.path.join(sweep_dir, SWEEP_FILE)) as f:
        data = json.load(f)
    for p in data["points"]:
        p["values"] = {k: tuple(v) if isinstance(v, list) else v for k, v in p["values"].items()}
    return Sweep(sweep_dir, data["keys"], data["points"], {})


# ------------------------------------------------------------------------------------------ running
def _identity(config_dict):
    return {k: v for k, v in config_dict.items() if k not in NOT_IDENTITY}


def run_status(cfg):
    """'done', 'resume', 'extend' (finished with fewer epochs: resumed with more) or 'new'; a ConfigError
    if the directory holds a run of another configuration."""
    d = cfg.out_dir
    saved = None
    try:
        with open(os.path.join(d, "config.json")) as f:
            saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        pass
    has_last = os.path.exists(os.path.join(d, "last.pt"))
    if saved is None:
        if has_last:
            raise ConfigError(f"out_dir: {d} holds a last.pt without config.json; remove it or choose another "
                              "--out-dir")
        return "new"
    want, have = _identity(cfg.to_dict()), _identity(RunConfig.from_dict(saved).to_dict())
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    extend = set(diff) == {"epochs"} and want["epochs"] > have["epochs"]
    if diff and not extend:
        raise ConfigError(f"out_dir: {d} holds a run of another configuration (saved → wanted: {diff}); "
                          "choose another --out-dir or remove that run")
    if extend:
        return "extend" if has_last else "new"
    try:
        with open(os.path.join(d, DONE_FILE)) as f:
            if json.load(f)["epochs"] == cfg.epochs:
                return "done"
    except (OSError, ValueError, KeyError):
        pass
    return "resume" if has_last else "new"


def run_one(cfg, log=print):
    """Train (or resume, or extend) the run of `cfg` to cfg.epochs and mark it done."""
    from .train import Trainer
    status = run_status(cfg)
    if status == "done":
        return status
    if status in ("resume", "extend"):
        trainer = Trainer.resume(cfg.out_dir, log=log, quiet=cfg.quiet, device=cfg.device, epochs=cfg.epochs)
        log(f"  resuming {cfg.out_dir} after epoch {trainer.epoch} of {cfg.epochs}")
    else:
        trainer = Trainer(cfg, log=log)
    trainer.fit()
    if trainer.preempted:  # SIGTERM / SIGUSR1: not done; last.pt holds the position for the next sweep
        raise SystemExit(f"sweep: {cfg.out_dir} stopped by a signal at step {trainer.step}; run the sweep "
                         "again to resume it from its last.pt")
    with open(os.path.join(cfg.out_dir, DONE_FILE), "w") as f:
        json.dump({"epochs": trainer.epoch, "best_test_robust_acc": trainer.best_metric,
                   "best_epoch": trainer.best_epoch}, f)
    return status


def _gpu_count():
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch CUDA: a CPU machine
        return 0


def run_parallel(todo, parallel, log=print, poll_s=1.0):
    """Run the configs of `todo` as child processes, `parallel` at once; returns the failed run dirs."""
    gpus = _gpu_count()
    threads = max(1, (os.cpu_count() or 1) // parallel)
    queue, running, failed = list(todo), {}, []
    free_slots = list(range(parallel))
    while queue or running:
        while queue and free_slots:
            cfg, slot = queue.pop(0), free_slots.pop(0)
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, POINT_FILE), "w") as f:
                json.dump(cfg.to_dict(), f)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            where = f"{threads} CPU threads"
            if gpus and cfg.device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)   # one run per GPU, round robin
                where = f"GPU {slot % gpus}"
            logf = open(os.path.join(cfg.out_dir, "train.log"), "a")
            proc = subprocess.Popen([sys.executable, "-m", "rwp_fast.sweep", "--run-point", cfg.out_dir],
                                    stdout=logf, stderr=subprocess.STDOUT, env=env)
            running[proc] = (cfg, slot, logf)
            log(f"  started {os.path.basename(cfg.out_dir)} ({where}; log {cfg.out_dir}/train.log)")
        time.sleep(poll_s)
        for proc in [p for p in running if p.poll() is not None]:
            cfg, slot, logf = running.pop(proc)
            logf.close()
            free_slots.append(slot)
            if proc.returncode != 0:
                failed.append(cfg.out_dir)
                log(f"  FAILED {os.path.basename(cfg.out_dir)} (exit {proc.returncode}; see its train.log)")
            else:
                log(f"  finished {os.path.basename(cfg.out_dir)}")
    return failed


def run_sweep(sweep, parallel=1, log=print):
    """Run every unfinished run of `sweep`, then summarise; returns (summary rows, failed run dirs)."""
    os.makedirs(sweep.directory, exist_ok=True)
    save_sweep_file(sweep)
    todo = []
    for point, run in sweep.runs():
        cfg = sweep.configs[run["dir"]]
        status = run_status(cfg)
        log(f"{run['dir']}: {'done, skipped' if status == 'done' else status}")
        if status != "done":
            todo.append(cfg)
    failed = []
    if parallel > 1 and len(todo) > 1:
        failed = run_parallel(todo, parallel, log)
    else:
        for i, cfg in enumerate(todo):
            log(f"== run {i + 1}/{len(todo)}: {os.path.basename(cfg.out_dir)}")
            run_one(cfg, log)
    return summarize(sweep.directory, log=log), failed


def _point_main(run_dir):
    """Child process of --parallel: run the config saved in RUN_DIR/point.json."""
    import torch
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    with open(os.path.join(run_dir, POINT_FILE)) as f:
        cfg = RunConfig.from_dict(json.load(f))
    run_one(cfg)


# ------------------------------------------------------------------------------------------ summary
def _read_rows(run_dir):
    from .train.plots import read_metrics
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


def _infer_sweep(sweep_dir):
    """A Sweep for a directory of runs without sweep.json: the swept keys are the config fields that
    differ between the runs (seed apart: runs that differ only in seed are seeds of one point)."""
    from .train.plots import read_config
    runs = sorted(d for d in os.listdir(sweep_dir) if os.path.isfile(os.path.join(sweep_dir, d, "metrics.jsonl")))
    configs = {d: read_config(os.path.join(sweep_dir, d)) or {} for d in runs}
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
    if os.path.isfile(os.path.join(sweep_dir, SWEEP_FILE)):
        sweep = load_sweep_file(sweep_dir)
    else:
        sweep = _infer_sweep(sweep_dir)
    if not sweep.points:
        raise ConfigError(f"summarize: {sweep_dir} holds no sweep.json and no run directories with metrics.jsonl")
    rows = []
    for point in sweep.points:
        per_run = []
        for run in point["runs"]:
            metrics = _read_rows(os.path.join(sweep_dir, run["dir"]))
            if metrics:
                per_run.append(run_stats(metrics))
        row = {"point": point["label"], **{k: format_value(v) for k, v in point["values"].items()},
               "seeds": len(per_run), "runs": len(point["runs"])}
        for col in STAT_COLUMNS:
            vals = [r[col] for r in per_run if col in r]
            row[col] = statistics.fmean(vals) if vals else None
            row[col + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        row["epochs"] = min((r["epochs"] for r in per_run), default=0)
        rows.append(row)
    _write_csv(os.path.join(sweep_dir, SUMMARY_CSV), rows, sweep.keys)
    log(summary_table(rows, seeds=any(len(p["runs"]) > 1 for p in sweep.points)))
    if any(r["seeds"] for r in rows):
        png = plot_summary(sweep, os.path.join(sweep_dir, SUMMARY_PNG))
        log(f"\nwrote {os.path.join(sweep_dir, SUMMARY_CSV)} and {png}")
    return rows


def _write_csv(path, rows, keys):
    columns = ["point", *[("lsc" if k == LSC_KEY else k) for k in keys], "seeds", "runs", "epochs"]
    for col in STAT_COLUMNS:
        if any(r[col] is not None for r in rows):
            columns += [col, col + "_std"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            r = {**r, "lsc": r.get(LSC_KEY)}
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c])
                        for c in columns])
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------------------------ figure
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
    elif key in ("epsilon", "alpha"):
        label = f"{key} (/255)"
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

    from .train.plots import read_config, threat_title

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
            rows = _read_rows(d)
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


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser):
    from .cli import add_config_flags
    from .config import PRESETS
    parser.add_argument("--preset", help=f"the base config: a paper preset ({len(PRESETS)}; `rwp-fast presets`)")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="sweep a RunConfig field over values (repeatable; product of the grids)")
    parser.add_argument("--zip", action="store_true", help="pair the grids element by element (equal lengths)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...", help="repeat every point once per seed")
    parser.add_argument("--lsc-ranges", default=None, metavar="P:Q,...",
                        help="LSC ranges [p, q) in nats; each sets lsc_low=p and c_min=q (q may be inf), "
                             f"e.g. {DEMO_LSC_RANGES}")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="runs at once (child processes; one per GPU, round robin; default 1)")
    parser.add_argument("--summarize", metavar="DIR", default=None,
                        help="only write DIR/summary.csv and summary.png and print the table")
    add_config_flags(parser)
    parser.epilog = "--out-dir is the sweep directory (default runs/sweep); each run is a directory in it."
    return parser


def main(args):
    from .cli import check_int, check_writable_dir, config_from_args
    if args.summarize:
        summarize(args.summarize)
        return 0
    check_int(args.parallel, "parallel", 1)
    grids = [parse_grid(g) for g in args.grid]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    lsc = parse_lsc_ranges(args.lsc_ranges) if args.lsc_ranges is not None else None
    if not grids and not lsc:
        raise ConfigError("grid: nothing to sweep; give --grid FIELD=V1,V2,... and/or --lsc-ranges P:Q,...")
    if seeds and "seed" in [g[0] for g in grids]:
        raise ConfigError("seeds: give the seeds with --seeds or --grid seed=..., not both")
    sweep_dir = args.out_dir or "runs/sweep"
    args.out_dir = None
    base = config_from_args(args)
    check_writable_dir(sweep_dir, "out_dir")
    sweep = build_sweep(base, sweep_dir, grids, args.zip, seeds, lsc)
    print(f"sweep of {len(sweep.points)} point(s) × {len(seeds or [base.seed])} seed(s) in {sweep_dir}")
    _, failed = run_sweep(sweep, args.parallel)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def lsc_demo(out_dir, epochs, quiet=False, device=None, ranges=DEMO_LSC_RANGES, parallel=1):
    """`rwp-fast demo --lsc-analysis`: AT-RWP on the digits with the perturbation driven by one LSC range
    per run (the paper's Fig. 1), with the digits demo's settings otherwise."""
    from .cli import demo_config
    base = demo_config("at-rwp", out_dir, epochs, quiet, device)
    sweep = build_sweep(base, out_dir, lsc_ranges=parse_lsc_ranges(ranges))
    print(f"LSC-range analysis: {len(sweep.points)} AT-RWP runs of {epochs} epochs on the digits in {out_dir}")
    _, failed = run_sweep(sweep, parallel)
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m rwp_fast.sweep")
    p.add_argument("--run-point", required=True, metavar="RUN_DIR")
    _point_main(p.parse_args().run_point)
