"""Running a sweep: which runs are done, one run after another in this process, or ``--parallel N``
child processes (``python -m rwp_fast.sweep --run-point RUN_DIR``)."""

import json
import os
import subprocess
import sys
import time

from .._fs import atomic_write
from ..config import EXIT_PREEMPTED, ConfigError
from ..readers import DONE_FILE, POINT_FILE, read_done, read_point, read_run_config
from .grid import NOT_IDENTITY, save_sweep_file
from .summary import summarize


def _identity(config_dict):
    return {k: v for k, v in config_dict.items() if k not in NOT_IDENTITY}


def run_status(cfg):
    """'done', 'resume', 'extend' (finished with fewer epochs: resumed with more) or 'new'; a ConfigError
    if the directory holds a run of another configuration."""
    d = cfg.out_dir
    if os.path.lexists(d) and not os.path.isdir(d):
        raise ConfigError(f"out_dir: the sweep's run directory {d} is a file; remove it or choose another --out-dir")
    info = read_run_config(d)   # shape-checked: a config.json that is not a run's is refused, naming it
    saved = info and info["config"]
    has_last = os.path.exists(os.path.join(d, "last.pt"))
    if saved is None:
        if has_last:
            raise ConfigError(f"out_dir: {d} holds a last.pt without config.json; remove it or choose another "
                              "--out-dir")
        return "new"
    want, have = _identity(cfg.to_dict()), _identity(saved)
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    extend = set(diff) == {"epochs"} and want["epochs"] > have["epochs"]
    if diff and not extend:
        raise ConfigError(f"out_dir: {d} holds a run of another configuration (saved → wanted: {diff}); "
                          "choose another --out-dir or remove that run")
    if extend:
        return "extend" if has_last else "new"
    done = read_done(d)
    if done is not None and done["epochs"] == cfg.epochs:
        return "done"
    return "resume" if has_last else "new"


def run_one(cfg, log=print):
    """Train (or resume, or extend) the run of `cfg` to cfg.epochs and mark it done."""
    from ..train import Trainer
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
        print(f"sweep: {cfg.out_dir} stopped by a signal at step {trainer.step}; run the sweep again to resume "
              "it from its last.pt", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED)
    done = {"epochs": trainer.epoch, "best_test_robust_acc": trainer.best_metric, "best_epoch": trainer.best_epoch}
    atomic_write(os.path.join(cfg.out_dir, DONE_FILE), lambda f: json.dump(done, f), mode="w")
    return status


def _gpu_count():
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch CUDA: a CPU machine
        return 0


def run_parallel(todo, parallel, log=print, poll_s=1.0):
    """Run the configs of `todo` as child processes, `parallel` at once; returns (failed run dirs, run dirs
    stopped by a signal: EXIT_PREEMPTED, last.pt written)."""
    gpus = _gpu_count()
    threads = max(1, (os.cpu_count() or 1) // parallel)
    queue, running, failed, stopped = list(todo), {}, [], []
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
            if proc.returncode == EXIT_PREEMPTED:
                stopped.append(cfg.out_dir)
                log(f"  STOPPED {os.path.basename(cfg.out_dir)} by a signal (last.pt written; run the sweep again)")
            elif proc.returncode != 0:
                failed.append(cfg.out_dir)
                log(f"  FAILED {os.path.basename(cfg.out_dir)} (exit {proc.returncode}; see its train.log)")
            else:
                log(f"  finished {os.path.basename(cfg.out_dir)}")
    return failed, stopped


def run_sweep(sweep, parallel=1, log=print):
    """Run every unfinished run of `sweep`, then summarise; returns (summary rows, failed run dirs). A sweep
    whose runs were stopped by a signal (and none failed) exits EXIT_PREEMPTED after the summary, as an
    in-process run does (run_one): run it again to resume them."""
    statuses = [(run["dir"], sweep.configs[run["dir"]]) for _, run in sweep.runs()]
    statuses = [(name, cfg, run_status(cfg)) for name, cfg in statuses]  # every run dir checked before any work
    os.makedirs(sweep.directory, exist_ok=True)
    save_sweep_file(sweep)
    todo = []
    for name, cfg, status in statuses:
        log(f"{name}: {'done, skipped' if status == 'done' else status}")
        if status != "done":
            todo.append(cfg)
    failed, stopped = [], []
    if parallel > 1 and len(todo) > 1:
        failed, stopped = run_parallel(todo, parallel, log)
    else:
        for i, cfg in enumerate(todo):
            log(f"== run {i + 1}/{len(todo)}: {os.path.basename(cfg.out_dir)}")
            run_one(cfg, log)
    rows = summarize(sweep.directory, log=log)
    if stopped and not failed:
        print(f"sweep: {len(stopped)} run(s) stopped by a signal with last.pt written; run the sweep again to "
              "resume them", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED)
    return rows, failed + stopped


def run_point(run_dir):
    """Child process of --parallel: run the config saved in RUN_DIR/point.json."""
    import torch
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    run_one(read_point(run_dir))
