"""Command line: ``rwp-fast train | eval | presets | plot | demo | verify | bench``.

``train`` mirrors RunConfig field for field (``--field-name``); ``--preset NAME`` loads a paper preset
and explicit flags override it. Errors a user can fix (missing data, bad values, corrupt checkpoints,
missing optional packages, unusable output paths) print one clear message and exit with status 2
(EXIT_USER_ERROR), without a traceback (set RWP_FAST_DEBUG=1 to see it), before any work starts; a bad
argument is one line too, with a pointer to --help. A run stopped by SIGTERM / SIGUSR1 exits with
EXIT_PREEMPTED (75) once last.pt is written.
"""

import argparse
import dataclasses
import os
import sys

from ._fs import check_output_dir, check_output_file
from .cli_args import add_config_flags, check_int, config_from_args
from .config import EXIT_USER_ERROR, FLAGS, PRESETS, ConfigError, RunConfig
from .readers import METRICS_FILE, SWEEP_FILE, read_metrics, read_run_config

CURVES = [("curves.png", "figure")]  # what a run directory gets besides the run's own files


# ------------------------------------------------------------------------------------------ commands
def cmd_presets(args):
    for name in sorted(PRESETS):
        print(f"{name:28s} " + " ".join(f"{k}={v}" for k, v in PRESETS[name].items()))


RESUME_FLAGS = ("quiet", "device", "epochs")  # quiet and device change nothing computed; epochs may extend a run


def check_train_inputs(args):
    """Every check of `rwp-fast train` that needs no data: the flags, the run directory's files and every
    output path (before --nproc starts N processes, which would each say it). The config, or None for --resume."""
    if not args.resume:
        cfg = config_from_args(args)
        check_new_run_dir(cfg.out_dir)
        if cfg.tensorboard:
            check_output_dir(os.path.join(cfg.out_dir, "tb"), "tensorboard")
        return cfg
    explicit = ["--" + FLAGS.get(f.name, f.name).replace("_", "-") for f in dataclasses.fields(RunConfig)
                if getattr(args, f.name) is not None and f.name not in RESUME_FLAGS]
    if explicit or args.preset:
        dropped = (["--preset"] if args.preset else []) + explicit
        raise ConfigError(f"resume: a resumed run keeps its saved config; drop {', '.join(dropped)} "
                          f"(allowed with --resume: {', '.join('--' + a for a in RESUME_FLAGS)})")
    if not os.path.isdir(args.resume):
        raise ConfigError(f"resume: {args.resume!r} is not a directory; allowed: a run directory holding last.pt")
    check_output_dir(args.resume, "resume", CURVES)
    info = read_run_config(args.resume)  # its shape checked; last.pt is checked against it on resume
    if info and info["config"]["tensorboard"]:
        check_output_dir(os.path.join(args.resume, "tb"), "tensorboard")
    return None


def cmd_train(args):
    from .train import Trainer, resolve_device
    from .train.plots import plot_runs
    cfg = check_train_inputs(args)
    if args.nproc is not None and args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch_nproc  # torchrun on this machine, N processes
        return launch_nproc(args.nproc, args.argv, cfg)
    if args.resume:
        overrides = {k: getattr(args, k) for k in RESUME_FLAGS if getattr(args, k) is not None}
        trainer = Trainer.resume(args.resume, **overrides)
        if trainer.dist.is_main:
            print(f"resuming {args.resume} after epoch {trainer.epoch} (step {trainer.step}) "
                  f"of {trainer.cfg.epochs}")
    else:
        resolve_device(cfg.device)  # a missing CUDA device is reported before anything is written
        trainer = Trainer(cfg)
    try:
        trainer.fit()
    except BaseException:
        trainer.dist.close(orderly=False)  # no gloo thread into shutdown (distributed.setup), and no barrier
        raise
    trainer.dist.close()
    if trainer.preempted:  # last.pt holds the position: a job chain resubmits on this status, not on 0
        from .train.distributed import preempted_status
        return preempted_status(trainer.dist.is_main)
    if not trainer.dist.is_main:  # only rank 0 writes
        return
    plot = plot_runs([trainer.out_dir], os.path.join(trainer.out_dir, "curves.png"))
    print(f"best test PGD-{trainer.cfg.eval_attack_steps} {100 * trainer.best_metric:.2f}% "
          f"at epoch {trainer.best_epoch}; run directory {trainer.out_dir}; plot {plot}")


def cmd_eval(args):
    import torch

    from .data import load_dataset
    from .data.subset import stratified_subset, subset_record
    from .eval import markdown_table, require_autoattack, run_eval_suite, write_json
    from .eval.suite import check_attacks, default_attacks
    from .models import build_model
    from .train import load_checkpoint, resolve_device
    from .train.checkpoint import weights_mismatch
    check_int(args.n_examples, "n_examples", 0)
    check_int(args.batch_size, "batch_size", 1)
    out = args.out if args.out is not None else os.path.splitext(args.checkpoint)[0] + "_eval.json"
    check_output_file(out, "out", "eval")  # before minutes of attacks, not after
    state = load_checkpoint(args.checkpoint)
    from .train.ema import select_weights
    weights, which = select_weights(state, args.weights, args.checkpoint)  # --weights ema|raw
    cfg = RunConfig.from_dict(state["config"])
    # the attacks fit the checkpoint's norm, and AutoAttack is installed, before any attack runs
    attacks, note = (args.attacks, None) if args.attacks is not None else default_attacks(cfg.norm)
    attacks = check_attacks(attacks, cfg.norm)
    if "autoattack" in attacks:
        require_autoattack(cfg.norm)
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
    check_output_file(args.out, "out", "figure")
    print(plot_runs(args.run_dirs, args.out))


def cmd_demo(args):
    """The README's main job: AT, AT-AWP and AT-RWP on the built-in digits data, then a Table-1 summary."""
    from .demo import DEMO_RUNS, digits_demo, lsc_demo
    check_int(args.epochs, "epochs", 1)
    check_output_dir(args.out_dir, "out_dir", CURVES)
    if getattr(args, "lsc_analysis", False):  # rwp_fast/demo.py: the LSC-range analysis as a sweep
        from .sweep import SUMMARY_OUTPUTS, SWEEP_FILE
        check_output_dir(os.path.join(args.out_dir, "lsc-analysis"), "out_dir",
                         [(SWEEP_FILE, "sweep"), *SUMMARY_OUTPUTS])
        return lsc_demo(os.path.join(args.out_dir, "lsc-analysis"), args.epochs, args.quiet, args.device)
    for name in DEMO_RUNS:  # each run resumes from its last.pt, or starts anew: checked before the first one
        run = os.path.join(args.out_dir, name)
        if not os.path.exists(os.path.join(run, "last.pt")):
            check_new_run_dir(run)
    return digits_demo(args.out_dir, args.epochs, args.quiet, args.device)



def check_new_run_dir(out_dir):
    """A new run may start in `out_dir`: a usable directory holding no run's checkpoint or metrics (the
    new run would truncate metrics.jsonl and overwrite config.json)."""
    if os.path.exists(os.path.join(out_dir, "last.pt")):
        raise ConfigError(f"out_dir: {out_dir} already holds a run (last.pt); continue it with "
                          f"--resume {out_dir} or choose another --out-dir")
    check_output_dir(out_dir, "out_dir", CURVES)
    if os.path.lexists(os.path.join(out_dir, SWEEP_FILE)):
        raise ConfigError(f"out_dir: {out_dir} is a sweep directory (sweep.json); a run goes into a directory of "
                          "its own: choose another --out-dir")
    if os.path.lexists(os.path.join(out_dir, METRICS_FILE)) and read_metrics(out_dir):
        raise ConfigError(f"out_dir: {out_dir} holds a run's metrics.jsonl but no last.pt to continue it from; "
                          "a new run there would erase those epochs; choose another --out-dir")


# ------------------------------------------------------------------------------------------ parser
class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is one line, `PROG: error: ... (see PROG --help)`, instead of
    the whole usage (36 lines for train). Subcommands' parsers are of this class too (add_subparsers)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    p = Parser(prog="rwp-fast", description=__doc__.splitlines()[0])
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
    p.commands = sub.choices  # main: an unknown flag is reported by its subcommand's parser
    return p


def main(argv=None):
    from .data import DatasetNotFoundError
    from .eval import AutoAttackUnavailable
    from .train import CheckpointError
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report these as the top-level parser's, pointing at `rwp-fast --help`
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # train --nproc passes it on to torchrun
    try:
        status = args.func(args)  # verify and bench return their exit status; the others None
    except (ConfigError, DatasetNotFoundError, CheckpointError, AutoAttackUnavailable, FileNotFoundError,
            ValueError, ImportError) as exc:  # ImportError: an explicit --backend that is not installed
        if os.environ.get("RWP_FAST_DEBUG") == "1":
            raise
        print(f"rwp-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
