"""Many processes, one run: torch.distributed (NCCL on CUDA, gloo on CPU), launched by torchrun.

What an N-process run computes (README, "Many GPUs"):

* ``batch_size`` is the *global* batch. Every process builds the same global batch of every step (same
  permutation, same augmentation draws) and keeps its share of the rows; the random draws of the step
  (augmentation, the attack's random start) are drawn ONCE for the whole global batch, from the
  generators seeded by (seed, epoch, step), and sliced (``BatchSlice``). The issue asked for seeds per
  (seed, epoch, step, rank); drawing per global batch is stronger: an N-process run computes the same
  numbers as the 1-process run with the same global batch (up to the order of floating-point sums,
  on models whose output does not depend on the batch split: no BatchNorm), and a run resumed with
  another world size stays on the same trajectory, because nothing random depends on the rank.
* Gradients: one all-reduce (sum, then ÷N) of the flat gradient buffer ``FlatWeights.g`` and one of the
  remaining parameters' gradients concatenated, after the training backward; so the weights are
  bit-identical on every process after every step (same reduced gradient, same optimizer arithmetic).
  Not DDP: DDP keeps its own gradient buckets (``.grad`` stops being a view of ``FlatWeights.g``, or
  becomes a view of DDP's bucket), would all-reduce during the probes' backward every parameter that
  requires grad (the probes freeze all but the flat weights: DDP needs find_unused_parameters and a
  graph traversal per backward), and must be kept out of the attack with ``no_sync``. What the manual
  all-reduce gives up is DDP's overlap of the all-reduce with the backward: it runs after the backward.
  bench/comm_model.py (a model, unmeasured) puts the whole step's all-reduce time, with no overlap at all,
  at 0.2 ms (AT) to 2.4 ms (AT-RWP, K2 = 10) per step for PreAct-18 on 8 GPUs over NVLink, against ≈ 2.7
  to 6.3 ms of compute per GPU: efficiency 0.93 to 0.73 (WRN-34-10: 0.98 to 0.89). Overlap could win back
  at most that gap, and for RWP 10 of the 11 all-reduces are probe gradients, which DDP could only overlap
  by running (and reducing) the probe backward through DDP as well. If a measurement shows the gap
  matters, per-segment hooks on FlatWeights can bucket and overlap the same all-reduce without DDP.
* RWP probes: the count of the LSC mask is all-reduced (one 8-byte sum per probe, on the device, before
  the host reads it for the early break) and so is each probe's flat gradient; the probe
  gradient is then (1/B_global)·Σ_ranks Σ_i V_i ∇ℓ_i, and every process breaks at the same probe.
* BatchNorm: local batch statistics (``--sync-bn``: SyncBatchNorm, CUDA only). The running statistics
  are broadcast from rank 0 after every step (as DDP's broadcast_buffers does), so every process holds
  rank 0's state — what last.pt saves — and a resume is exact.
* Preemption: SIGTERM / SIGUSR1 set a flag; at every step boundary the flags are combined (one 4-byte
  all-reduce on a gloo group, on the host: no GPU sync), and all processes stop together. Rank 0 writes
  last.pt with the mid-epoch position.
"""

import datetime
import gc
import importlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from ..config import EXIT_PREEMPTED, ConfigError

BACKEND_ENV = "RWP_FAST_DIST_BACKEND"       # nccl | gloo; default: nccl on CUDA, gloo on CPU
TIMEOUT_ENV = "RWP_FAST_DIST_TIMEOUT_S"     # process-group timeout; a dead peer ends the job after it
DEFAULT_TIMEOUT_S = 600                     # 10 min: longer than any one collective's wait for a slow peer
                                            # (an eval epoch of WRN-34-10 PGD-20 on 10k images ≈ 1–2 min)
BACKENDS = ("nccl", "gloo")
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by launch_nproc for its ranks: a file where rank 0 notes a stop by a signal. The ranks then exit 0 (a
# non-zero rank makes torchrun print a failure report) and the launcher exits EXIT_PREEMPTED for them.
STOP_FILE_ENV = "RWP_FAST_STOP_FILE"


def preempted_status(is_main):
    """The exit status of a process whose run stopped on SIGTERM / SIGUSR1 with last.pt written:
    EXIT_PREEMPTED, or 0 under launch_nproc, whose launcher exits EXIT_PREEMPTED instead (rank 0 tells it)."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if not stop_file:
        return EXIT_PREEMPTED
    if is_main:
        with open(stop_file, "w") as f:
            f.write("preempted\n")
    return 0


def env_world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """Rank, world size and the collectives the trainer uses; world_size 1 is a plain run (no-ops)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    control_group: object = None   # gloo group for the host-side preemption flag

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def rows(self, n):
        """[start, stop) of this process's share of n rows (equal shares when N divides n)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def sum_(self, tensor):
        """In-place all-reduce (sum); returns the tensor."""
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor

    def average_(self, tensor):
        """In-place all-reduce (sum) then ÷ world size (gloo has no AVG)."""
        if self.enabled:
            self.sum_(tensor).div_(self.world_size)
        return tensor

    def average_grads_(self, params):
        """One all-reduce for the gradients of `params` (all ranks hold the same set), concatenated."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        flat = self.average_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def broadcast_from_main_(self, tensors):
        """Overwrite `tensors` (floating point) with rank 0's, in one broadcast per dtype."""
        if not self.enabled:
            return
        import torch.distributed as dist
        groups = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.broadcast(flat, 0)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def any_(self, flag):
        """True on every process if `flag` is true on any (host-side, on the gloo control group)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.item())

    def close(self, orderly=True):
        """Destroy the process groups. orderly: every process got here (a run that ended, not one that
        raised: then a barrier would wait for peers that never come, for the whole timeout)."""
        global _control_group
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                # Every process reaches this point before any tears its connections down, so no peer is
                # mid-collective when the other closes its sockets. (The SIGABRT at exit once blamed on this
                # was the default group outliving destroy_process_group: see setup.)
                if orderly:
                    dist.barrier()
                # Contexts left in unreachable reference cycles (a FastTrainStep holds wrappers of its own
                # bound methods; bench_dist makes one per row) still hold the control group: free them first.
                gc.collect()
                dist.destroy_process_group()
            self.world_size = 1
            self.control_group = _control_group = None  # our last references: the groups' threads end

    @staticmethod
    def collective_threads():
        """Names of this process's gloo threads (Linux /proc; [] where unreadable). Empty after close()
        unless something outside still holds a process group (see setup)."""
        try:
            tasks = os.listdir("/proc/self/task")
        except OSError:
            return []
        names = []
        for task in tasks:
            try:
                with open(f"/proc/self/task/{task}/comm") as f:
                    names.append(f.read().strip())
            except OSError:  # a thread that ended since the listing
                pass
        return [n for n in names if n.startswith(("pt_gloo", "gloo_"))]


def setup(cfg, device):
    """(DistContext, device) from torchrun's environment; a plain run when WORLD_SIZE is unset or 1.

    Every launch error is a one-line ConfigError raised before the process group exists, so a bad launch
    ends every process at once instead of leaving some waiting for the others.
    """
    world = env_world_size()
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise ConfigError(f"{BACKEND_ENV}: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ConfigError(f"{BACKEND_ENV}: the nccl backend needs CUDA, but this run is on {device.type} "
                          f"(CUDA available: {torch.cuda.is_available()}); use gloo (the default on CPU)")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise ConfigError(f"nproc_per_node: {local_world} processes on this node but {gpus} GPU(s); one "
                              f"process per GPU (allowed: nproc_per_node <= {gpus})")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    check_batch(cfg, world)
    if cfg.backend == "reference":
        raise ConfigError("backend: 'reference' runs one process only (it has no all-reduce); with "
                          "WORLD_SIZE > 1 use one of auto, cuda, triton, torch")
    if cfg.sync_bn and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm runs on CUDA only; on CPU drop --sync-bn (local batch "
                          "statistics)")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    # Imported before the group exists, on purpose: torch.distributed.nn.functional binds
    # ``group=group.WORLD`` as a default argument when first imported. torch._dynamo imports it (through
    # fsdp and _shard), and we import dynamo after init, so its ten functions would hold the default group
    # for the life of the process: destroy_process_group could not free it, gloo's worker threads would
    # live into interpreter shutdown, and one that releases its last collective there needs the GIL, gets
    # killed by the finalizing interpreter mid-destructor, and aborts the process ("terminate called without
    # an active exception", SIGABRT after the run had finished: 1 run in ~20 in CI, gdb core 2026-12-07).
    importlib.import_module("torch.distributed.nn.functional")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    global _control_group
    if _control_group is None and backend != "gloo":  # one per process: a setup per benchmark row reuses it
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(rank, world, local_rank, backend, _control_group), device


_control_group = None  # the gloo group of a NCCL run's host-side flags, made by the first setup


def check_batch(cfg, world):
    """batch_size is the global batch: N must divide it (with extra data, its two parts too:
    data.batches.check_split)."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: the global batch {cfg.batch_size} does not divide among {world} "
                          f"processes; allowed: a multiple of {world}")


class PreemptionFlag:
    """SIGTERM / SIGUSR1 → ``requested`` (checked at step boundaries); previous handlers restored on exit."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        return False


def strip_nproc(argv):
    """argv without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _child_pids(pid):
    """The direct children of `pid` (Linux /proc), or [] where that cannot be read."""
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        return []
    return pids


SHUTDOWN_TIMEOUT_S = 600  # torchrun's grace period after SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), see below


def launch_nproc(nproc, argv, cfg=None):
    """``rwp-fast train --nproc N ...``: run ``torchrun --standalone --nproc_per_node N -m rwp_fast ...``
    on this machine and return its exit status. Checks what it can before starting N processes."""
    if nproc < 1:
        raise ConfigError(f"nproc: must be an integer >= 1, got {nproc}")
    if cfg is not None:
        check_batch(cfg, nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rwp_fast"] + strip_nproc(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(
        1, (os.cpu_count() or 1) // nproc)))}
    # torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM by default; a stop is seen at the next
    # step boundary, which can be behind a whole per-epoch evaluation (minutes for WRN-34-10).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    stop_fd, stop_file = tempfile.mkstemp(prefix="rwp-fast-stop.")
    os.close(stop_fd)
    env[STOP_FILE_ENV] = stop_file
    proc = subprocess.Popen(cmd, env=env)
    # Both preemption signals go to the ranks themselves as SIGTERM: they stop together at the next step
    # boundary, rank 0 writes last.pt (and the stop file), they exit 0 and so does torchrun, and the launcher
    # exits EXIT_PREEMPTED. Not to torchrun: it does not
    # handle SIGUSR1 (it would die and orphan the ranks, which would train on unsupervised), and a
    # SIGTERM makes it exit non-zero even when every rank stopped cleanly. Where /proc cannot name the
    # ranks, torchrun gets the SIGTERM and forwards it.
    def forward(signum, frame):
        for pid in _child_pids(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        status = proc.wait()
        with open(stop_file) as f:  # rank 0 wrote it: every rank stopped cleanly at a signal, last.pt written
            return EXIT_PREEMPTED if status == 0 and f.read().strip() == "preempted" else status
    finally:
        os.unlink(stop_file)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
