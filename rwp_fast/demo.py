"""``rwp-fast demo``: AT, AT-AWP and AT-RWP on the built-in digits data with a Table-1 summary, and
``--lsc-analysis``, the same AT-RWP run once per LSC range (the paper's Fig. 1) as a sweep."""

import os

from .cli_args import env_backend
from .config import EXIT_PREEMPTED, RunConfig
from .readers import read_metrics
from .sweep import DEMO_LSC_RANGES, build_sweep, parse_lsc_ranges, run_sweep

DEMO_RUNS = ("at", "at-awp", "at-rwp")
# Digits demo settings (see README, "The demo"): chosen for 8×8 images with 17 grey levels.
DEMO = dict(epsilon_255=32.0, alpha_255=8.0, gamma=0.01, c_min=1.0, batch_size=64, lr=0.05, milestones=(20, 25))


def demo_config(name, out_dir, epochs, quiet, device):
    """The digits demo configuration; the README explains each choice."""
    perturb = {"at": "none", "at-awp": "awp", "at-rwp": "rwp"}[name]
    return RunConfig(
        dataset="digits", model="small_cnn", norm="linf",
        epsilon_255=DEMO["epsilon_255"], alpha_255=DEMO["alpha_255"], attack_steps=10, eval_attack_steps=20,
        method="at", perturb=perturb, gamma=DEMO["gamma"], c_min=DEMO["c_min"], k2=10,
        epochs=epochs, batch_size=DEMO["batch_size"], lr=DEMO["lr"], lr_milestones=DEMO["milestones"],
        weight_decay=5e-4, eval_examples=0, seed=0, out_dir=os.path.join(out_dir, name), quiet=quiet,
        device=device or "auto", backend=env_backend() or "auto",
    ).validate()


def digits_demo(out_dir, epochs, quiet=False, device=None):
    """The README's main job: the three runs of DEMO_RUNS (each resumed from its last.pt if there is one),
    their curves in OUT_DIR/curves.png and the table."""
    from .train import Trainer
    from .train.plots import plot_runs
    rows, dirs = [], []
    for name in DEMO_RUNS:
        cfg = demo_config(name, out_dir, epochs, quiet, device)
        print(f"== {name}: {cfg.perturb}, {cfg.epochs} epochs on {cfg.dataset} ({cfg.model}, ε={cfg.epsilon_255}/255)")
        if os.path.exists(os.path.join(cfg.out_dir, "last.pt")):
            trainer = Trainer.resume(cfg.out_dir, quiet=cfg.quiet, device=cfg.device)
        else:
            trainer = Trainer(cfg)
        trainer.fit()
        if trainer.preempted:  # SIGTERM / SIGUSR1: last.pt holds the position; `rwp-fast demo` again resumes
            return EXIT_PREEMPTED
        metrics = read_metrics(cfg.out_dir)
        rows.append((name.upper(), 100 * trainer.best_metric, 100 * metrics[-1]["test_robust_acc"],
                     100 * metrics[-1]["test_natural_acc"], metrics[-1]["rwp_steps_mean"]))
        dirs.append(cfg.out_dir)
    plot = plot_runs(dirs, os.path.join(out_dir, "curves.png"), labels=[r[0] for r in rows])
    print(f"\nDigits (sklearn, 8×8), small CNN, L∞ ε={cfg.epsilon_255}/255, PGD-{cfg.eval_attack_steps} "
          f"test robust accuracy (%), best/last:\n")
    print("| method | PGD-20 best/last | natural (last) | RWP probes/step |")
    print("|---|---|---|---|")
    for name, best, last, nat, steps in rows:
        print(f"| {name} | {best:.2f}/{last:.2f} | {nat:.2f} | {steps:.2f} |")
    print(f"\nplot: {plot}")


def lsc_demo(out_dir, epochs, quiet=False, device=None, ranges=DEMO_LSC_RANGES, parallel=1):
    """`rwp-fast demo --lsc-analysis`: AT-RWP on the digits with the perturbation driven by one LSC range
    per run (the paper's Fig. 1), with the digits demo's settings otherwise."""
    base = demo_config("at-rwp", out_dir, epochs, quiet, device)
    sweep = build_sweep(base, out_dir, lsc_ranges=parse_lsc_ranges(ranges))
    print(f"LSC-range analysis: {len(sweep.points)} AT-RWP runs of {epochs} epochs on the digits in {out_dir}")
    _, failed = run_sweep(sweep, parallel)
    return 1 if failed else 0
