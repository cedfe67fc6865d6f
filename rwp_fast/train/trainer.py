"""One training loop for AT, TRADES and RST × none / AWP / RWP, driven by a RunConfig.

The loop owns data order, the per-iteration lr schedule, the weight-perturbation warm-up (counted in
epochs), the per-epoch PGD-20 evaluation, metrics.jsonl, checkpoints (best.pt by test PGD-20, last.pt)
and resume. What one step computes is delegated to a step function with the signature of
``rwp_fast.reference.train_step_ref``: ``cfg.backend == 'reference'`` runs that oracle, any other backend
the fast path (``FastTrainStep``) with the fused ops on that backend.

Reproducibility: every random draw of a step (augmentation, attack start) comes from generators seeded
by (seed, epoch, step), never from global RNG state, so a run resumed from the checkpoint written at
the end of epoch e replays epoch e + 1 with the same draws as the uninterrupted run. On a CPU it is then
bit for bit the same run; on a GPU only with ``deterministic`` (README, "Resume and determinism"):
cuDNN's default backward algorithms are nondeterministic, and the LSC mask and the early break are hard
thresholds, so a last-bit difference can become another probe count. last.pt written inside an
epoch (SIGTERM / SIGUSR1, or ``checkpoint_every_steps``) also holds the position in the epoch and the
epoch's running metric sums, and a resume continues from that step.

Many processes (torchrun): see ``rwp_fast.train.distributed``. Only rank 0 writes files.
"""

import collections
import json
import math
import os
import sys
import time

import torch

from .. import _env
from ..config import DEVICES, ConfigError, RunConfig
from ..core import BatchSlice
from ..data import BatchIterator, load_dataset
from ..data.subset import stratified_subset, subset_record
from ..eval.epoch import evaluate_natural_and_pgd
from ..models import build_model
from ..reference import train_step_ref
from . import distributed, tb_log  # tb_log: --tensorboard
from ..readers import read_run_config
from .checkpoint import (CheckpointError, check_checkpoint_of_run, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state, weights_mismatch)
from .ema import EMATracker  # weight averaging (--ema-decay)
from .fast_step import FastTrainStep, resolve_fast_settings
from .stats import EpochStats

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise ConfigError(f"device: {name!r} is not one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but torch sees no CUDA device; "
                          "use one of auto, cpu (auto picks CUDA when there is one)")
    return torch.device(name)


# cuBLAS's deterministic workspace setting (docs: "Reproducibility"); ':16:8' is the smaller alternative.
CUBLAS_WORKSPACE = ":4096:8"


_SAVED_DETERMINISM = None  # the flags apply_determinism(True) replaced, until a later run turns it off


def apply_determinism(enabled):
    """``--deterministic``: deterministic cuDNN (benchmark off, deterministic algorithms),
    ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic implementation then raises,
    naming itself, instead of running nondeterministically) and CUBLAS_WORKSPACE_CONFIG, which cuBLAS needs
    for repeatable matmuls (a value the user set is kept). Process-wide: off puts back the flags an earlier
    deterministic run in this process replaced, and otherwise changes nothing. On a CPU every op is already
    deterministic."""
    global _SAVED_DETERMINISM
    if not enabled:
        # a deterministic run earlier in this process (a sweep's in-process points) set process-wide flags:
        # put back what was there before it, so this run is not silently deterministic (and slower)
        if _SAVED_DETERMINISM is not None:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, algorithms = _SAVED_DETERMINISM
            torch.use_deterministic_algorithms(algorithms)
            _SAVED_DETERMINISM = None
        return
    if _SAVED_DETERMINISM is None:
        _SAVED_DETERMINISM = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                              torch.are_deterministic_algorithms_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def step_seed(seed, epoch, step, stream=0):
    """A distinct 63-bit seed per (run seed, epoch, step, stream); stream 0 is the attack start."""
    return (seed * 1_000_003 + epoch * 100_003 + step * 7 + stream) % (2 ** 63 - 1)


def git_commit():
    """The commit of the rwp-fast source tree ('+dirty' if tracked files differ), or 'unknown'."""
    return _env.git_commit() or "unknown"


def lr_factor(cfg, iteration, iters_per_epoch):
    """Multiplier of cfg.lr at a (0-based) optimizer iteration; set every iteration (SPEC.md §3)."""
    epoch_float = iteration / iters_per_epoch
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch_float / cfg.epochs, 1.0)))
    passed = sum(1 for m in cfg.lr_milestones if epoch_float >= m)
    return cfg.lr_decay ** -passed


def _take(x, y, idx):
    """(x[idx], y[idx]); the tensors themselves (no copy) when idx is the whole split."""
    if len(idx) == len(y):
        return x, y
    return x[idx], y[idx]


class Trainer:
    """Builds data, model, optimizer and schedule from a RunConfig and runs (or resumes) training."""

    def __init__(self, cfg: RunConfig, step_fn=None, log=print, dtype=torch.float32):
        """dtype: the weights' and the batches' dtype. float64 is for the equivalence tests
        (tests/dist_worker.py): the run is then fp64 end to end. The command line always builds fp32 weights
        (cfg.precision chooses the autocast dtype)."""
        self.cfg = cfg.validate()
        self.dtype = dtype
        self.log = log
        self.device = resolve_device(cfg.device)
        self.dist, self.device = distributed.setup(cfg, self.device)  # plain run unless torchrun set WORLD_SIZE
        if self.device.type == "cpu" and cfg.precision == "fp16" and cfg.backend != "reference":
            # CPU autocast to fp16 runs most ops in fp32 with casts around them: slower than fp32, and
            # its loss scaling guards a range problem CPUs do not have. Refused rather than run slowly.
            raise ConfigError("precision: 'fp16' needs a CUDA device (fp16 autocast on CPU is not a speed "
                              "path); on CPU use one of auto, fp32, bf16")
        apply_determinism(cfg.deterministic)  # before any CUDA work: cuBLAS reads its setting at its first call
        torch.manual_seed(cfg.seed)
        if cfg.download and self.dist.enabled and not self.dist.is_main:
            self.dist.any_(False)  # wait for rank 0's download: N processes extracting into one folder race
        self.data = load_dataset(cfg)
        if cfg.download and self.dist.enabled and self.dist.is_main:
            self.dist.any_(False)
        # The per-epoch evaluation's images, fixed for the run: a seeded class-stratified sample of
        # eval_examples test images (the first N of a class-sorted folder set are a few classes), and as
        # many training images for the train accuracy. Also used by the EMA's evaluation (ema.py).
        d = self.data
        test_idx = stratified_subset(d.test_y, cfg.eval_examples, cfg.subset_seed)
        train_idx = stratified_subset(d.train_y, len(test_idx), cfg.subset_seed)
        self.eval_subsets = {"test": subset_record(d.test_y, cfg.eval_examples, cfg.subset_seed),
                             "train_accuracy": subset_record(d.train_y, len(test_idx), cfg.subset_seed)}
        self.eval_test = _take(d.test_x, d.test_y, test_idx)
        self.eval_train = _take(d.train_x, d.train_y, train_idx)
        self.model = build_model(cfg.model, self.data.num_classes, self.data.in_channels,
                                 self.data.mean, self.data.std).to(self.device, dtype)
        if self.dist.enabled:
            if cfg.sync_bn:  # CUDA only (distributed.setup refuses it on CPU)
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # the same seed gives the same initial weights everywhere; the broadcast makes it a guarantee
            self.dist.broadcast_from_main_([*self.model.parameters(), *self.model.buffers()])
        # float buffers (BN running statistics) follow rank 0's after every step, so that every process
        # holds what last.pt saves and evaluates the same model
        self.synced_buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        # The whole (uint8) training set moves to the device once; batches are cut and augmented there.
        # channels-last from load to loss where the fast step runs channels-last (no layout copy per step)
        channels_last = cfg.backend != "reference" and resolve_fast_settings(cfg, self.device)[2]
        self.batches = BatchIterator(self.data.train_x, self.data.train_y, cfg.batch_size, seed=cfg.seed,
                                     device=self.device, augment=self.data.augment, extra=self.data.extra,
                                     shard=(self.dist.rank, self.dist.world_size), channels_last=channels_last)
        self.iters_per_epoch = len(self.batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(cfg, it, self.iters_per_epoch))
        if step_fn is None and cfg.backend != "reference":
            from ..ops import set_backend
            set_backend(cfg.backend)
            step_fn = FastTrainStep(self.model, self.optimizer, cfg, self.device, dist=self.dist)
        self.step_fn = step_fn or train_step_ref
        # One generator for the whole run, reseeded by (seed, epoch, step) before every step: the draws
        # equal those of a fresh generator per step, and a CUDA graph can keep using the same object.
        self.step_generator = torch.Generator(device=self.device)
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps so far
        self.position = 0       # steps done in the current epoch (mid-epoch checkpoints)
        self.resumed_stats = None  # that epoch's running sums (EpochStats.state) from a mid-epoch last.pt
        self.after_step = None  # tests: called with the trainer after every step
        self.first_step_s = None  # seconds to the end of this process's first step (compile, capture): logged once
        self.preempt = None     # PreemptionFlag while fit() runs
        self.stop_agreed = False
        self.preempted = False  # fit() ended early on SIGTERM / SIGUSR1 (last.pt holds the position)
        self.best_metric = -1.0
        self.best_epoch = -1
        self.metrics_lines = 0
        self.out_dir = cfg.out_dir
        self.ema_tracker = EMATracker(cfg, self.model)  # after step_fn: it has set the weights' layout

    @property
    def ema(self):
        """The weight average (rwp_fast.train.ema.WeightEMA), or None without --ema-decay."""
        return self.ema_tracker.ema

    @property
    def best_ema_metric(self):
        return self.ema_tracker.best_metric

    @property
    def best_ema_epoch(self):
        return self.ema_tracker.best_epoch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self):
        return {
            "format_version": 1,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "metrics_lines": self.metrics_lines,
            "position": self.position,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            # fp16 fast path: the loss scale, so that a resumed run scales exactly as an uninterrupted one
            "grad_scaler": scaler.state_dict() if (scaler := getattr(self.step_fn, "scaler", None)) else {},
            **self.ema_tracker.checkpoint_state(self.model),  # ema, best_ema_metric, best_ema_epoch (with EMA)
        }

    def load_state_dict(self, state, source="checkpoint"):
        saved = RunConfig.from_dict(state["config"])
        if saved.to_dict() != self.cfg.to_dict():
            diff = {k: (v, self.cfg.to_dict()[k]) for k, v in saved.to_dict().items()
                    if self.cfg.to_dict()[k] != v}
            raise CheckpointError(f"{source}: its config differs from this run's: {diff}")
        d = self.data
        mismatch = weights_mismatch(state["model"], self.cfg.model, d.num_classes, d.in_channels, d.mean, d.std)
        if mismatch:
            raise CheckpointError(f"{source}: {mismatch}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: does not fit the model/optimizer of this config ({exc})") \
                from None
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.metrics_lines = state["metrics_lines"]
        self.position = state.get("position", 0)
        self.resumed_stats = state.get("epoch_stats")
        if self.position and self.position >= self.iters_per_epoch:
            raise CheckpointError(f"{source}: position {self.position} in the epoch, but an epoch has "
                                  f"{self.iters_per_epoch} steps here")
        scaler = getattr(self.step_fn, "scaler", None)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        self.ema_tracker.load_checkpoint_state(state, source)
        set_rng_state(state["rng"])

    @classmethod
    def resume(cls, run_dir, log=print, **overrides):
        """Continue the run in `run_dir` from its last.pt, with its own saved config.

        overrides: quiet and device (not part of the run's identity), and epochs, only upward, to extend
        a run. Extending keeps every other setting: a piecewise schedule keeps its milestones at the
        epochs they were set for, so the added epochs run at the lr reached after the last milestone, and
        the extended run is step for step the run that was started with the larger `epochs` (the data
        order and every random draw depend on (seed, epoch, step) only). A cosine schedule is defined over
        the run's length: extending it would lift the lr from its end value back up, so it is refused.
        """
        path = os.path.join(run_dir, "last.pt")
        state = load_checkpoint(path)
        check_checkpoint_of_run(state, path, run_dir)  # last.pt from another run: refused, naming both
        saved = RunConfig.from_dict(state["config"])
        epochs = overrides.get("epochs")
        if epochs is not None and epochs != saved.epochs:
            if epochs < saved.epochs:
                raise ConfigError(f"epochs: a resumed run can only be extended; {run_dir} was set for "
                                  f"{saved.epochs} epochs, got --epochs {epochs} (allowed: >= {saved.epochs})")
            if saved.lr_schedule == "cosine":
                raise ConfigError(f"epochs: {run_dir} uses the cosine lr schedule, defined over its "
                                  f"{saved.epochs} epochs; extending it would raise the lr again. Extend "
                                  "only piecewise runs (allowed lr_schedule: piecewise)")
        cfg = RunConfig.from_dict({**state["config"], **overrides, "out_dir": run_dir})
        trainer = cls(cfg, log=log)
        state["config"] = cfg.to_dict()  # overrides (quiet, device, epochs) are checked above
        trainer.load_state_dict(state, source=f"checkpoint {path}")
        trainer._warn_on_other_eval_subsets(run_dir, state["epoch"])
        return trainer

    def _warn_on_other_eval_subsets(self, run_dir, epochs_done):
        """A run begun before the seeded, stratified evaluation subsets (or with other data) evaluated its
        first epochs on other images: its metrics.jsonl then mixes two subsets. Said once, not refused."""
        info = read_run_config(run_dir)  # its shape checked: a config.json holding [] is one line, not a crash
        if info is None:
            return
        previous = info.get("eval_subsets")
        if epochs_done > 0 and previous != self.eval_subsets:
            before = "on an unrecorded subset (the first N images: an rwp-fast older than the stratified " \
                     "subsets)" if previous is None else f"on {previous}"
            self.log(f"warning: {run_dir} evaluated its first {epochs_done} epoch(s) {before}; the epochs from "
                     f"here on use {self.eval_subsets['test']}, so metrics.jsonl mixes two evaluation subsets")

    def _truncate_metrics(self):
        """Keep only the metrics lines that belong to the current state (0 for a fresh run): drops an
        epoch logged after the last checkpoint, or a stale file of a run that never checkpointed.
        Rewritten atomically, so a crash here cannot lose the lines that are kept."""
        path = os.path.join(self.out_dir, METRICS_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()[: self.metrics_lines]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ running
    def _write_run_files(self):
        os.makedirs(self.out_dir, exist_ok=True)
        info = {"config": self.cfg.to_dict(), "git_commit": git_commit(), "torch": torch.__version__,
                "device": str(self.device), "eval_subsets": self.eval_subsets,
                # the mode the fast step starts in, after any fallback at construction (no GPU graphs on a CPU)
                "step_mode": getattr(self.step_fn, "mode", "reference")}
        tmp = os.path.join(self.out_dir, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, CONFIG_FILE))

    def _progress(self, epoch):
        from tqdm import tqdm
        disable = self.cfg.quiet or not sys.stderr.isatty() or not self.dist.is_main
        return tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                    disable=disable, leave=False, unit="step")

    def train_epoch(self):
        """One epoch from self.position. Returns its metrics, or None when the processes agreed to stop
        (SIGTERM / SIGUSR1) before its end; last.pt then holds the position."""
        cfg, epoch, dist = self.cfg, self.epoch, self.dist
        perturb_active = epoch >= cfg.warmup_epochs
        start_step = self.position
        if self.resumed_stats is not None and start_step > 0:
            stats = EpochStats.from_state(self.resumed_stats, self.device, keep_sums=dist.is_main)
        else:
            stats = EpochStats()
        self.resumed_stats = None
        session_images = 0  # images/s of a resumed epoch counts this session's images only
        first_step_s = None  # set in the epoch where this process ran its first step
        self.model.train()
        start = time.perf_counter()
        bar = self._progress(epoch)
        bar.update(start_step)
        lr = self.optimizer.param_groups[0]["lr"]
        modes_before = collections.Counter(getattr(self.step_fn, "mode_counts", {}))
        for i, (x, y) in enumerate(self.batches.epoch(epoch, start_step), start=start_step):
            gen = self.step_generator.manual_seed(step_seed(cfg.seed, epoch, i))  # same draws as a new one
            if dist.enabled:  # the draws of the global batch, this process's rows of them
                gen = BatchSlice(gen, self.batches.rank_rows(i), cfg.batch_size)
            result = self.step_fn(self.model, self.optimizer, x.to(self.dtype), y, cfg,
                                  perturb_active=perturb_active, generator=gen)
            if self.first_step_s is None:  # the warm-up users wait through: one line, and in metrics.jsonl
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # once per process: the step's work, not its launch
                self.first_step_s = first_step_s = time.perf_counter() - start
                self.log(f"warm-up: the first step ended after {self.first_step_s:.1f} s (step mode "
                         f"{getattr(self.step_fn, 'mode', 'reference')}: compilation included; a captured run "
                         f"captures its phases at step 3, after two warm-up steps)")
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
            self.scheduler.step()
            self.step += 1
            self.position = i + 1
            if dist.enabled:
                dist.broadcast_from_main_(self.synced_buffers)
            self.ema_tracker.update(self.step)  # after step_fn: the weights are w again, never w + v
            stats.add(result, y)
            session_images += len(y)
            bar.update(1)
            if not bar.disable and (i % 10 == 0 or i + 1 == self.iters_per_epoch):  # reading syncs
                elapsed = time.perf_counter() - start
                bar.set_postfix(img_s=f"{stats.images / max(elapsed, 1e-9):.0f}",
                                loss=f"{float(result.loss):.3f}", acc=f"{float(stats.correct) / stats.images:.3f}")
            if self.after_step is not None:
                self.after_step(self)
            # one host-side 4-byte all-reduce per step: every process stops at the same step boundary
            self.stop_agreed = dist.any_(self.preempt is not None and self.preempt.requested)
            every = cfg.checkpoint_every_steps
            mid = self.position < self.iters_per_epoch
            if mid and (self.stop_agreed or (every and self.step % every == 0)):
                self._save_mid_epoch(stats)
                if self.stop_agreed:
                    bar.close()
                    return None
        bar.close()
        stats = stats.reduce(dist)
        images = stats.images if start_step == 0 else session_images * dist.world_size  # equal shares
        out = stats.summary()  # reads the device-side sums: the epoch's work is done after this
        seconds = time.perf_counter() - start
        out.update(seconds=seconds, images_per_second=images / max(seconds, 1e-9), lr=lr,
                   perturb_active=perturb_active, **self._step_modes(modes_before, self.position - start_step))
        if first_step_s is not None:
            out["first_step_s"] = round(first_step_s, 3)
        self.position = 0
        return out

    def _step_modes(self, before, steps):
        """step_modes: {mode: steps of this session's part of the epoch} as each step really ran
        (FastTrainStep.step_mode; 'reference' for --backend reference), and phase_fallbacks when a phase
        left fullgraph (phase_compile)."""
        counts = getattr(self.step_fn, "mode_counts", None)
        if counts is None:
            return {"step_modes": {"reference": steps}}
        out = {"step_modes": dict(collections.Counter(counts) - before)}
        if self.step_fn.fallbacks:
            out["phase_fallbacks"] = list(self.step_fn.fallbacks)
        return out

    def _save_mid_epoch(self, stats):
        """last.pt at the current step: position and the epoch's running sums (global: reduced here)."""
        reduced = stats.reduce(self.dist).state()  # a collective: every process calls it
        if self.dist.is_main:
            save_checkpoint(os.path.join(self.out_dir, "last.pt"), {**self.state_dict(), "epoch_stats": reduced})

    def evaluate(self):
        cfg = self.cfg
        test = evaluate_natural_and_pgd(self.model, *self.eval_test, cfg, cfg.eval_attack_steps,
                                        max(cfg.batch_size, 128), self.device, seed=cfg.seed, dist=self.dist)
        train = evaluate_natural_and_pgd(self.model, *self.eval_train, cfg, 0,
                                         max(cfg.batch_size, 128), self.device, dist=self.dist)
        return {"test_natural_acc": test["natural_acc"], "test_natural_loss": test["natural_loss"],
                "test_robust_acc": test["robust_acc"], "test_robust_loss": test["robust_loss"],
                "test_examples": len(self.eval_test[1]),
                "train_natural_acc": train["natural_acc"], "train_natural_loss": train["natural_loss"],
                "train_acc_examples": len(self.eval_train[1])}

    def fit(self):
        """Train until cfg.epochs; returns the list of per-epoch metric dicts written this call.

        SIGTERM / SIGUSR1 end it at the next step boundary (every process together) with last.pt written
        at that position and ``self.preempted`` set. Only rank 0 writes files.
        """
        main = self.dist.is_main
        if main:
            self._write_run_files()
            self._truncate_metrics()
        tb = tb_log.open_log(self) if main else None  # None without --tensorboard
        written = []
        self.preempted = False
        with distributed.PreemptionFlag() as self.preempt:
            while self.epoch < self.cfg.epochs:
                train_row = self.train_epoch()
                if train_row is None:
                    self.preempted = True
                    break
                row = {"epoch": self.epoch + 1, **train_row}
                row.update(self.evaluate())
                self.epoch += 1
                row["step"] = self.step
                improved = row["test_robust_acc"] > self.best_metric
                if improved:
                    self.best_metric, self.best_epoch = row["test_robust_acc"], self.epoch
                row.update(best_test_robust_acc=self.best_metric, best_epoch=self.best_epoch)
                row.update(self.ema_tracker.epoch_metrics(self.model, self.data, self.eval_test, self.epoch,
                                                          self.device, self.dist))  # *_ema columns, with EMA only
                self.metrics_lines += 1
                written.append(row)
                if main:
                    self._write_epoch(row, improved, tb)
                if self.stop_agreed:  # the stop came at the epoch's last step: its checkpoint is written
                    self.preempted = self.epoch < self.cfg.epochs
                    break
        self.preempt = None
        if tb is not None:
            tb.close()
        if self.preempted and main:
            self.log(f"stopped by a signal at epoch {self.epoch + 1} step {self.position} (global step "
                     f"{self.step}); last.pt holds that position: continue with --resume {self.out_dir}")
        return written

    def _write_epoch(self, row, improved, tb):
        with open(os.path.join(self.out_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if tb is not None:
            tb.log_row(row)
        state = self.state_dict()
        if improved:
            save_checkpoint(os.path.join(self.out_dir, "best.pt"), state)
        self.ema_tracker.save_best(self.out_dir, state)  # best_ema.pt, by the EMA's own robust accuracy
        save_checkpoint(os.path.join(self.out_dir, "last.pt"), state)
        self.log(f"epoch {row['epoch']:>3}/{self.cfg.epochs}  loss {row['train_robust_loss']:.4f}  "
                 f"test nat {row['test_natural_acc']:.4f}  PGD-{self.cfg.eval_attack_steps} "
                 f"{row['test_robust_acc']:.4f}  {row['images_per_second']:.0f} img/s  "
                 f"rwp steps {row['rwp_steps_mean']:.2f}  lr {row['lr']:.4g}")
