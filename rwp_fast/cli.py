"""Command line: ``rwp-fast train | eval | presets | plot | demo | verify | bench``.

``train`` mirrors RunConfig field for field (``--field-name``); ``--preset NAME`` loads a paper preset
and explicit flags override it. Errors a user can fix (missing data, bad values, corrupt checkpoints,
missing optional packages) print one clear message and exit with status 2, without a traceback
(set RWP_FAST_DEBUG=1 to see it).
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import tempfile

from . import config as config_module
from .config import PRESETS, ConfigError, RunConfig, preset

DEMO_RUNS = ("at", "at-awp", "at-rwp")


def _allowed_values(match):
    """'one of DATASETS' → 'one of digits, cifar10, ...' (left as written if config has no such tuple)."""
    values = getattr(config_module, match.group(1), None)
    return "one of " + ", ".join(values) if isinstance(values, tuple) else match.group(0)


def _field_help():
    """Help text of each RunConfig field: the comment on its line in config.py (one source of truth)."""
    helps = {}
    for line in inspect.getsource(RunConfig).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], |]+ = .*?#\s*(.*)$", line)
        if m:
            # "one of DATASETS" in config.py's comment → the values themselves in the help text
            helps[m.group(1)] = re.sub(r"one of ([A-Z_]+)", _allowed_values, m.group(2))
    return helps


def add_config_flags(parser):
    """One flag per RunConfig field; defaults are None so that we can tell which flags were given."""
    helps = _field_help()
    group = parser.add_argument_group("run configuration (mirrors rwp_fast.config.RunConfig)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f"{helps.get(f.name, '')} (default: {default})"
        if isinstance(default, bool) or f.type in ("bool | None", bool | None):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=f.name, type=int, nargs="*", default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=type(default), default=None, help=text)


def config_from_args(args):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    if args.preset:
        return preset(args.preset, **given)
    return RunConfig(**given).validate()


# ------------------------------------------------------------------------------------------ outputs
def check_writable_dir(path, flag):
    """Create directory `path` (and its parents) if missing and write a probe file there; a ConfigError
    naming `flag` if that fails (a parent that is a file, no permission, read-only file system)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".rwp-fast-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot create or write directory {path!r} ({exc.strerror or exc}); "
                          "allowed: a writable directory (created if missing)") from None


def check_writable_file(path, flag):
    """An output file may be written at `path`: its directory exists and is writable, and `path` is not a
    directory. Nothing is created. A ConfigError naming `flag` otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a directory; allowed: a file path in a writable directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag}: the directory {directory!r} of {path!r} does not exist; allowed: a file "
                          "path in an existing, writable directory")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".rwp-fast-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {directory!r} ({exc.strerror or exc}); allowed: a file "
                          "path in an existing, writable directory") from None


def check_int(value, flag, minimum):
    if value < minimum:
        raise ConfigError(f"{flag}: must be an integer >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------ commands
def cmd_presets(args):
    for name in sorted(PRESETS):
        print(f"{name:28s} " + " ".join(f"{k}={v}" for k, v in PRESETS[name].items()))


def cmd_train(args):
    from .train import Trainer, resolve_device
    from .train.plots import plot_runs
    if args.nproc is not None and args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch_nproc  # torchrun on this machine, N processes
        return launch_nproc(args.nproc, args.argv, None if args.resume else config_from_args(args))
    if args.resume:
        # quiet and device do not change what is computed; epochs may extend a run (Trainer.resume)
        allowed = ("quiet", "device", "epochs")
        explicit = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)
                    if getattr(args, f.name) is not None and f.name not in allowed]
        if explicit or args.preset:
            dropped = (["--preset"] if args.preset else []) + explicit
            raise ConfigError(f"resume: a resumed run keeps its saved config; drop {', '.join(dropped)} "
                              f"(allowed with --resume: {', '.join('--' + a for a in allowed)})")
        if not os.path.isdir(args.resume):
            raise ConfigError(f"resume: {args.resume!r} is not a directory; allowed: a run directory "
                              "holding last.pt")
        check_writable_dir(args.resume, "resume")
        overrides = {k: getattr(args, k) for k in allowed if getattr(args, k) is not None}
        trainer = Trainer.resume(args.resume, **overrides)
        if trainer.dist.is_main:
            print(f"resuming {args.resume} after epoch {trainer.epoch} (step {trainer.step}) "
                  f"of {trainer.cfg.epochs}")
    else:
        cfg = config_from_args(args)
        if os.path.exists(os.path.join(cfg.out_dir, "last.pt")):
            raise ConfigError(f"out_dir: {cfg.out_dir} already holds a run (last.pt); continue it with "
                              f"--resume {cfg.out_dir} or choose another --out-dir")
        resolve_device(cfg.device)  # a missing CUDA device is reported before anything is written
        check_writable_dir(cfg.out_dir, "out_dir")
        trainer = Trainer(cfg)
    trainer.fit()
    trainer.dist.close()
    if trainer.preempted or not trainer.dist.is_main:  # only rank 0 writes; a stopped run has no final plot
        return
    plot = plot_runs([trainer.out_dir], os.path.join(trainer.out_dir, "curves.png"))
    print(f"best test PGD-{trainer.cfg.eval_attack_steps} {100 * trainer.best_metric:.2f}% "
          f"at epoch {trainer.best_epoch}; run directory {trainer.out_dir}; plot {plot}")


def cmd_eval(args):
    import torch

    from .data import load_dataset
    from .data.subset import stratified_subset, subset_record
    from .eval import markdown_table, run_eval_suite, write_json
    from .eval.suite import default_attacks
    from .models import build_model
    from .train import load_checkpoint, resolve_device
    from .train.checkpoint import weights_mismatch
    check_int(args.n_examples, "n_examples", 0)
    check_int(args.batch_size, "batch_size", 1)
    out = args.out or os.path.splitext(args.checkpoint)[0] + "_eval.json"
    state = load_checkpoint(args.checkpoint)
    from .train.ema import select_weights
    weights, which = select_weights(state, args.weights, args.checkpoint)  # --weights ema|raw
    check_writable_file(out, "out")  # before minutes of attacks, not after
    cfg = RunConfig.from_dict(state["config"])
    if args.data_dir:
        cfg = cfg.replace(data_dir=args.data_dir)
    if args.subset_seed is not None:  # validated as the config field is
        cfg = cfg.replace(subset_seed=args.subset_seed).validate()
    device = resolve_device(args.device or "auto")
    data = load_dataset(cfg)
    mismatch = weights_mismatch(weights, cfg.model, data.num_classes, data.in_channels, data.mean,
                                data.std)
    if mismatch:
        raise ConfigError(f"checkpoint {args.checkpoint}: {mismatch}")
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.mean, data.std)
    model.load_state_dict(weights)
    print(f"weights: {which}")
    model.to(device)
    # a seeded class-stratified sample, the one the run's per-epoch evaluation used for the same N and
    # seed (rwp_fast/data/subset.py); the whole test set by default
    idx = stratified_subset(data.test_y, args.n_examples, cfg.subset_seed)
    subset = subset_record(data.test_y, args.n_examples, cfg.subset_seed)
    if subset["stratified"]:
        print(f"test subset: {subset['n']} of {subset['of']} images, class-stratified, seed {cfg.subset_seed}")
    attacks = args.attacks
    if attacks is None:
        attacks, note = default_attacks(cfg.norm)
        if note:
            print(f"note: {note}")
    torch.manual_seed(args.seed)
    results = run_eval_suite(model, data.test_x[idx], data.test_y[idx], cfg.eps, cfg.step_size, cfg.norm,
                             attacks, args.batch_size, device, args.seed, log=print)
    title = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) or "model"
    table = markdown_table(results, title=title)
    print(table)
    write_json(out, results, {"checkpoint": os.path.abspath(args.checkpoint), "epoch": state["epoch"],
                              "weights": which, "config": cfg.to_dict(), "test_subset": subset,
                              "table": table})
    print(f"wrote {out}")


def cmd_plot(args):
    from .train.plots import plot_runs
    check_writable_file(args.out, "out")
    print(plot_runs(args.run_dirs, args.out))


def cmd_demo(args):
    """The README's main job: AT, AT-AWP and AT-RWP on the built-in digits data, then a Table-1 summary."""
    from .train import Trainer
    from .train.plots import plot_runs
    check_int(args.epochs, "epochs", 1)
    check_writable_dir(args.out_dir, "out_dir")
    if getattr(args, "lsc_analysis", False):  # rwp_fast/sweep.py: the LSC-range analysis as a sweep
        from .sweep import lsc_demo
        return lsc_demo(os.path.join(args.out_dir, "lsc-analysis"), args.epochs, args.quiet, args.device)
    rows, dirs = [], []
    for name in DEMO_RUNS:
        cfg = demo_config(name, args.out_dir, args.epochs, args.quiet, args.device)
        print(f"== {name}: {cfg.perturb}, {cfg.epochs} epochs on {cfg.dataset} ({cfg.model}, ε={cfg.epsilon}/255)")
        if os.path.exists(os.path.join(cfg.out_dir, "last.pt")):
            trainer = Trainer.resume(cfg.out_dir, quiet=cfg.quiet, device=cfg.device)
        else:
            trainer = Trainer(cfg)
        trainer.fit()
        if trainer.preempted:  # SIGTERM / SIGUSR1: last.pt holds the position; `rwp-fast demo` again resumes
            return
        with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        rows.append((name.upper(), 100 * trainer.best_metric, 100 * metrics[-1]["test_robust_acc"],
                     100 * metrics[-1]["test_natural_acc"], metrics[-1]["rwp_steps_mean"]))
        dirs.append(cfg.out_dir)
    plot = plot_runs(dirs, os.path.join(args.out_dir, "curves.png"), labels=[r[0] for r in rows])
    print(f"\nDigits (sklearn, 8×8), small CNN, L∞ ε={cfg.epsilon}/255, PGD-{cfg.eval_attack_steps} "
          f"test robust accuracy (%), best/last:\n")
    print("| method | PGD-20 best/last | natural (last) | RWP probes/step |")
    print("|---|---|---|---|")
    for name, best, last, nat, steps in rows:
        print(f"| {name} | {best:.2f}/{last:.2f} | {nat:.2f} | {steps:.2f} |")
    print(f"\nplot: {plot}")


def demo_config(name, out_dir, epochs, quiet, device):
    """The digits demo configuration; the README explains each choice."""
    perturb = {"at": "none", "at-awp": "awp", "at-rwp": "rwp"}[name]
    return RunConfig(
        dataset="digits", model="small_cnn", norm="linf",
        epsilon=DEMO["epsilon"], alpha=DEMO["alpha"], attack_steps=10, eval_attack_steps=20,
        method="at", perturb=perturb, gamma=DEMO["gamma"], c_min=DEMO["c_min"], k2=10,
        epochs=epochs, batch_size=DEMO["batch_size"], lr=DEMO["lr"], lr_milestones=DEMO["milestones"],
        weight_decay=5e-4, eval_examples=0, seed=0, out_dir=os.path.join(out_dir, name), quiet=quiet,
        device=device or "auto",
    ).validate()


# Digits demo settings (see README, "The demo"): chosen for 8×8 images with 17 grey levels.
DEMO = dict(epsilon=32.0, alpha=8.0, gamma=0.01, c_min=1.0, batch_size=64, lr=0.05, milestones=(20, 25))


# ------------------------------------------------------------------------------------------ parser
def build_parser():
    p = argparse.ArgumentParser(prog="rwp-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (AT, TRADES, RST × none/AWP/RWP)")
    t.add_argument("--preset", help=f"a paper preset ({len(PRESETS)}; see `rwp-fast presets`)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N processes on this machine with torchrun, one per GPU (batch_size stays the "
                        "global batch); several machines: run torchrun yourself (README, 'Many GPUs')")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="the paper's Table 2 evaluation suite on a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--n-examples", type=int, default=0,
                   help="evaluate a seeded class-stratified sample of N test examples (0 = all, the default)")
    e.add_argument("--subset-seed", type=int, default=None,
                   help="seed of that sample (default: the run's subset_seed, so that N = the run's "
                        "eval_examples gives the images its per-epoch evaluation used)")
    e.add_argument("--attacks", default=None,
                   help="comma-separated subset of natural,fgsm,fgm,pgd20,pgd100,cw,autoattack (default: "
                        "natural,fgsm,pgd20,pgd100,cw,autoattack for an L∞ checkpoint; for L2, fgm (one L2 "
                        "step of size ε) replaces fgsm and every attack runs in L2)")
    e.add_argument("--batch-size", type=int, default=256, help="examples per attack batch (>= 1)")
    e.add_argument("--data-dir", default=None, help="override the data directory saved in the checkpoint")
    e.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="the weight average (a run with --ema-decay) or the raw weights (default: ema for "
                        "best_ema.pt, the checkpoint chosen by the EMA's accuracy; raw otherwise)")
    e.add_argument("--out", default=None, help="JSON output (default: CHECKPOINT_eval.json)")
    e.set_defaults(func=cmd_eval)

    from .export import add_export_parser
    add_export_parser(sub)

    sub.add_parser("presets", help="list the paper presets").set_defaults(func=cmd_presets)

    pl = sub.add_parser("plot", help="learning curves of one or more runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default="curves.png")
    pl.set_defaults(func=cmd_plot)

    d = sub.add_parser("demo", help="AT, AT-AWP, AT-RWP on the built-in digits data (the README's main job)")
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--lsc-analysis", action="store_true",
                   help="instead: AT-RWP with one LSC range per run (the paper's Fig. 1) in OUT_DIR/lsc-analysis")
    d.set_defaults(func=cmd_demo)

    # verify and bench live in their own modules (rwp_fast/verify/run.py, bench/user.py); registered here.
    from .verify import run as verify_run
    v = sub.add_parser("verify", help="check the fused kernels against the reference on this machine",
                       description=verify_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify_run.add_arguments(v).set_defaults(func=verify_run.main)
    from .bench import user as bench_user
    b = sub.add_parser("bench", help="training throughput here: released-code structure vs the fast path",
                       description=bench_user.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_user.add_arguments(b).set_defaults(func=bench_user.main)
    from . import sweep
    s = sub.add_parser("sweep", help="run a grid of runs (any field, seeds, LSC ranges) and summarise it",
                       description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_arguments(s).set_defaults(func=sweep.main)
    return p


def main(argv=None):
    from .data import DatasetNotFoundError
    from .eval import AutoAttackUnavailable
    from .train import CheckpointError
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # train --nproc passes it on to torchrun
    try:
        status = args.func(args)  # verify and bench return their exit status; the others None
    except (ConfigError, DatasetNotFoundError, CheckpointError, AutoAttackUnavailable, FileNotFoundError,
            ValueError, ImportError) as exc:  # ImportError: an explicit --backend that is not installed
        if os.environ.get("RWP_FAST_DEBUG") == "1":
            raise
        print(f"rwp-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
