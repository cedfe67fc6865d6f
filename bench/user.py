"""``rwp-fast bench``: training throughput on this machine, released-code structure vs the fast path.

The same engine as ``python -m bench`` (``bench_e2e.py``; this folder ships as ``rwp_fast.bench``), with a
user's defaults: PreAct ResNet-18 at batch 128, AT, AT-AWP and AT-RWP, variants ``released`` and ``fast``
(the trainer's default step: on CUDA its phases captured as CUDA graphs; ``--variants released,fast,compiled``
adds the same phases compiled but not captured). It prints images/s, the speed-up over the released
structure, AT-RWP/AT step time, the RWP probes taken, MFU against a bf16 matmul measured in the same run and
the mode each step ran in; ``--json`` and ``--plot`` write the figures down (the JSON summary also has the
phase replays per step of captured rows and the host, GPU and GPU-busy ms per step).

On CPU the figures show only the algorithmic savings (input-only attack gradients, no proxy copies, the
early break): there is no bf16 autocast, no compile, no fused kernel and no MFU there, and it runs small.
"""

import argparse
import os
import sys

from rwp_fast._env import csv_list as _csv

# user method name → the engine's method key. AT-RWP is measured in the all-probes regime (c_min = inf:
# all K2 probes run, the worst case); 'at-rwp-break' is the early-break regime.
METHODS = {"at": "at", "at-awp": "at-awp", "at-rwp": "at-rwp-all", "at-rwp-break": "at-rwp-break"}
DEFAULT_METHODS = ("at", "at-awp", "at-rwp")
DEFAULT_VARIANTS = ("released", "fast")
CPU_NOTE = ("CPU: these figures show only the algorithmic savings (input-only attack gradients, no proxy "
            "copies, the early break); no bf16, compile, fused kernels or MFU on CPU. Run on a GPU for speed.")
SCHEMA = 1


# The engine is imported inside the functions below: importing it here would import torch for every
# `rwp-fast` command (cli.py imports this module to register the subcommand).


def add_arguments(p):
    from rwp_fast.config import MODELS
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="default preact_resnet18 (CPU: small_cnn, 32×32 inputs)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (CPU: 32)")
    p.add_argument("--methods", type=_csv(tuple(METHODS)), default=list(DEFAULT_METHODS),
                   help=f"subset of {','.join(METHODS)} (at-rwp: all K2 probes; at-rwp-break: early break)")
    # checked against the engine's VARIANTS in engine_args(): importing the engine here would import torch
    # for every `rwp-fast` command
    p.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
                   default=list(DEFAULT_VARIANTS),
                   help="comma-separated subset of e2e_configs.VARIANTS (released, reference, fast, compiled, "
                        "no-compile, ...)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 5; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; later configurations are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny run (small_cnn b8, K1=2, K2=3): checks that it runs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary and every engine row here")
    p.add_argument("--plot", default=None, metavar="FILE", help="bar chart of images/s by variant (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def engine_args(args, device):
    """The engine's argument namespace for this run (bench_e2e.parse_args, so defaults stay in one place)."""
    from rwp_fast.bench.bench_e2e import parse_args
    from rwp_fast.bench.e2e_configs import VARIANTS
    cpu = device == "cpu"
    model = args.model or ("small_cnn" if cpu or args.smoke else "preact_resnet18")
    # `is None`, not `or`: --batch-size 0 is a bad value to refuse, not a request for the default
    batch = args.batch_size if args.batch_size is not None else (8 if args.smoke else 32 if cpu else 128)
    if batch < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch}")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        raise ValueError(f"--variants: expected a comma-separated subset of {','.join(VARIANTS)}; "
                         f"got {','.join(args.variants) or 'nothing'}")
    argv = ["--device", device, "--models", model, "--batch-sizes", str(batch),
            "--variants", ",".join(args.variants), "--methods", ",".join(METHODS[m] for m in args.methods),
            "--skip", "check", "--no-results", "--time-budget", str(args.time_budget)]
    for flag in ("steps", "repeats", "warmup"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    if args.smoke:
        argv.append("--smoke")
    return parse_args(argv), argv


def summarise(rows, methods):
    """One line per (variant, method): images/s, ×released, step ms, time vs AT, probes, MFU, the step's mode and
    its steps by mode, any fullgraph fallback, seconds to the first step and to the first captured step (the
    compile and capture cost), replays per step (captured rows), host/GPU/GPU-busy ms per step (CUDA)."""
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    ratio = {(r["variant"], r["method_key"]): r["time_ratio_vs_at"] for r in rows if r.get("kind") == "ratio"}
    key_to_user = {v: k for k, v in METHODS.items()}
    out = []
    for r in e2e:
        out.append(dict(model=r["model"], batch=r["batch"], method=key_to_user.get(r["method_key"], r["method_key"]),
                        variant=r["variant"], images_per_s=r.get("images_per_s"),
                        speedup_vs_released=r.get("speedup_vs_released"), step_ms=r.get("step_ms"),
                        time_vs_at=1.0 if r["method_key"] == "at" and r.get("images_per_s") else
                        ratio.get((r["variant"], r["method_key"])),
                        probes=r.get("probes"), expected_probes=r.get("expected_probes"), mfu=r.get("mfu"),
                        mode=r.get("mode"), fallback=r.get("fallback"), replays_per_step=r.get("replays_per_step"),
                        expected_replays_per_step=r.get("expected_replays_per_step"),
                        host_ms_per_step=r.get("host_ms_per_step"), gpu_ms_per_step=r.get("gpu_ms_per_step"),
                        gpu_busy_ms_per_step=r.get("gpu_busy_ms_per_step"),
                        gpu_busy_fraction=r.get("gpu_busy_fraction"), cudagraph_skips=r.get("cudagraph_skips"),
                        first_step_s=r.get("first_step_s"), first_captured_step_s=r.get("first_captured_step_s"),
                        mode_counts=r.get("mode_counts"), timed_mode_counts=r.get("timed_mode_counts"),
                        fallbacks=r.get("fallbacks"), note=r.get("note", "")))
    order = {m: i for i, m in enumerate(methods)}
    out.sort(key=lambda s: (order.get(s["method"], 99)))
    return out


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def print_summary(summary, meta, file=None):
    file = file or sys.stdout
    print(f"\ndevice: {meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
          f"CUDA {meta.get('cuda')}; MFU ceiling: {_f(meta.get('ceiling_tflops'), '.0f')} TFLOP/s "
          f"({meta.get('ceiling_op')})", file=file)
    head = f"{'method':<14}{'variant':<18}{'images/s':>10}{'×released':>11}{'step ms':>10}{'÷AT time':>10}" \
           f"{'probes':>8}{'MFU':>7}{'1st step s':>11}{'1st capt. s':>12}  {'mode':<10}note"
    print(head, file=file)
    print("-" * (len(head) + 10), file=file)
    for s in summary:
        mfu = None if s["mfu"] is None else 100 * s["mfu"]
        print(f"{s['method']:<14}{s['variant']:<18}{_f(s['images_per_s'], '.1f'):>10}"
              f"{_f(s['speedup_vs_released'], '.2f'):>11}{_f(s['step_ms'], '.1f'):>10}{_f(s['time_vs_at'], '.2f'):>10}"
              f"{_f(s['probes'], 'd'):>8}{(_f(mfu, '.1f') + '%') if mfu is not None else '-':>7}"
              f"{_f(s.get('first_step_s'), '.1f'):>11}{_f(s.get('first_captured_step_s'), '.1f'):>12}  "
              f"{s.get('mode') or '-':<10}{s['note']}",
              file=file)
    if meta.get("device_type") == "cpu":
        print(CPU_NOTE, file=file)


def plot(summary, meta, path):
    """Bars of images/s per variant, grouped by method, with ×released written on every non-released bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(s["method"] for s in summary))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    by = {(s["method"], s["variant"]): s for s in summary}
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(methods), 4.2))
    for j, v in enumerate(variants):
        xs, ys = [], []
        for i, m in enumerate(methods):
            s = by.get((m, v))
            xs.append(i + (j - (len(variants) - 1) / 2) * width)
            ys.append(s["images_per_s"] if s and s["images_per_s"] else 0.0)
        bars = ax.bar(xs, ys, width * 0.95, label=v)
        for x, y, m in zip(xs, ys, methods):
            s = by.get((m, v))
            text = "n/a" if not y else (f"×{s['speedup_vs_released']:.2f}" if s.get("speedup_vs_released")
                                        and v != "released" else f"{y:.0f}/s")
            ax.annotate(text, (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        del bars
    ax.set_xticks(range(len(methods)), [m.upper() for m in methods])
    ax.set_ylabel("images / s (higher is better)")
    ax.margins(y=0.15)
    s0 = summary[0] if summary else {}
    ax.set_title(f"{s0.get('model', '')} b{s0.get('batch', '')} on {meta.get('device')}"
                 + (" (CPU: algorithmic savings only)" if meta.get("device_type") == "cpu" else ""), fontsize=9)
    ax.legend(fontsize=8, title="variant (label: ×released)", title_fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args):
    import torch

    from rwp_fast.bench import bench_e2e, common
    from rwp_fast.bench.e2e_configs import build_plan
    from rwp_fast.bench.e2e_report import summary_rows
    from rwp_fast.bench.e2e_timing import matmul_ceiling
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available; use --device cpu")
    eargs, argv = engine_args(args, device)
    if device == "cpu":
        print(CPU_NOTE, file=sys.stderr)
        if args.smoke:
            torch.set_num_threads(1)
    dev = torch.device(device)
    meta = common.run_metadata(dev)
    meta["command"] = "rwp-fast bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else argv)
    meta["device_type"] = dev.type
    meta["ceiling_tflops"], meta["ceiling_op"] = matmul_ceiling(dev)
    units = build_plan(eargs)
    total = len(units) * len(eargs.methods)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="rwp-fast bench", unit="config", file=sys.stderr)

    class Suite(bench_e2e.Suite):
        def append(self, row):
            super().append(row)
            if bar is not None and row.get("kind") == "e2e":
                bar.set_postfix_str(f"{row['variant']} {row['method_key']}")
                bar.update(1)

        def flush(self):
            # --json is rewritten whenever the engine saves a row (the moment it is timed, before its
            # profiles), with the ratios of the rows so far: a run cut short keeps every figure it made
            if args.json and not self.finished:
                rows = [dict(r) for r in self.rows if r.get("kind") == "e2e"]
                rows += summary_rows(rows, {}, meta, eargs.smoke)
                write_report(args.json, meta, summarise(rows, args.methods), rows, partial=True)

        def log(self, msg):
            if bar is None:
                super().log(msg)

    try:
        suite = Suite(eargs, meta, dev)
        suite.finished = False
        rows = suite.run(units)
        suite.finished = True  # main() writes the whole report
    finally:
        if bar is not None:
            bar.close()
    summary = summarise(rows, args.methods)
    return meta, rows, summary


def write_report(path, meta, summary, rows, partial=False):
    """The --json report; ``partial``: written while the run goes on (its rows so far)."""
    from rwp_fast.bench import common
    from rwp_fast.bench.e2e_report import jsonable
    report = dict(schema=SCHEMA, kind="rwp-fast bench", partial=partial, meta=meta, summary=summary, rows=rows)
    common.write_json(jsonable(report), path)


def main(args):
    """Entry of ``rwp-fast bench``; returns the exit status (1 if no configuration produced a figure)."""
    from rwp_fast._fs import check_output_file  # every output checked before the first timed step
    for path, flag, kind in ((args.json, "json", "bench"), (args.plot, "plot", "figure")):
        if path:
            check_output_file(path, flag, kind)
    meta, rows, summary = run(args)
    print_summary(summary, meta)
    if args.json:
        write_report(args.json, meta, summary, rows)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(summary, meta, args.plot)}")
    return 0 if any(s["images_per_s"] for s in summary) else 1


def cli(argv=None):
    p = add_arguments(argparse.ArgumentParser(prog="rwp-fast bench", description=__doc__.splitlines()[0]))
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
