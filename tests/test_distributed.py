"""Multi-process training (issue 11) on CPU: gloo, 2 processes under torchrun, tiny runs on digits.

* equivalence: a 2-process run with global batch 32 equals the 1-process run with batch 32 after every step,
  for AT, AT-AWP, AT-RWP (accumulate, paper), on small_cnn_gn (GroupNorm:
  per-example statistics), in float64 (error model at RTOL). The training metrics and the sharded
  evaluation agree likewise; the LSC masks, the probe counts and the accuracies exactly;
* BatchNorm (small_cnn): weights bit-identical on both processes after every step;
* the LSC mask empty on one process only: no deadlock, the same v on both, equal to the 1-process v (fp64);
* SIGTERM to one process mid-epoch, then --resume: last.pt equals the uninterrupted 2-process run's;
* bad launches: one-line errors, before any process group exists.

Every launch runs under a timeout in its own session, killed whole on expiry: no test can hang.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rwp_fast.config import EXIT_PREEMPTED, ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker  # noqa: E402
from equivalence import Records, assert_clear_of_thresholds  # noqa: E402

# Error model, float64 (u = 2^-53 ≈ 1.1e-16). 2 processes and 1 run the same fp64 operations on the same
# values except the order of sums: the batch mean (the average of two 16-row means vs one 32-row mean), the
# convolutions and gradient reductions over 16 vs 32 rows, the gradient all-reduce of two halves, and the
# thread count (the 1-process run here uses pytest's, the workers 1). Each sum is within n·u of the exact
# one, n ≤ 56,554 (the global weight norm): ≤ 6e-12 relative, which 4 SGD steps carry on without growth (in
# fp32, u = 6e-8, the difference stayed ≤ 6e-8 relative to the largest weight). Measured in fp64: ≤ 1.1e-16
# relative to the largest weight after 4 steps, v of the empty-mask search bit-equal. 1e-9 leaves a margin of
# 150× over the worst-case bound on any machine, and still catches a hidden fp32 cast of the gradient
# all-reduce (6e-8 relative per gradient: every case fails by step 4, the empty-mask v at once).
RTOL = 1e-9

TIMEOUT_S = 240
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "RWP_FAST_DIST_TIMEOUT_S": "60",
       # an abort at process exit (a gloo thread alive into interpreter shutdown, distributed.setup) would
       # name its thread and C++ frame here; dist_worker's trace now checks that no gloo thread survives close
       "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}


def launch(cmd, timeout=TIMEOUT_S):
    """Run cmd in its own session; on timeout kill the whole session (torchrun and its workers)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=os.path.dirname(HERE))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang): {' '.join(cmd)}\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    rc, log = launch(TORCHRUN + [os.path.join(HERE, "dist_worker.py"), "trace", str(out)])
    assert rc == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["at", "at-awp", "at-rwp-accumulate", "at-rwp-paper"])
def test_two_processes_equal_one_process_step_by_step(traces, name):
    cfg = dist_worker.scenarios()[name]
    one = dist_worker.trace(cfg)   # this process: WORLD_SIZE unset, a plain run of batch 32, fp64
    two = traces[0][name]
    # The masks and the early break compare losses with c_min: exact below only if no loss of either run
    # lies within rounding of it. 1e-6 is 10^10 fp64 ulps; checked on every probe of both runs.
    for run in (one, two, traces[1][name]):
        probes = Records(cfg.lsc_range)
        probes.probe_losses = run["probe_losses"]
        assert_clear_of_thresholds(probes)
    assert (len(one["probe_losses"]) > 0) == (cfg.perturb == "rwp")
    assert len(two["weights"]) == len(one["weights"]) == 4
    assert all(w.dtype == torch.float64 for w in one["weights"] + two["weights"])
    for step, (a, b, c) in enumerate(zip(two["weights"], traces[1][name]["weights"], one["weights"])):
        assert torch.equal(a, b), f"step {step}: the two processes' weights differ"
        torch.testing.assert_close(a, c, rtol=RTOL, atol=RTOL * float(c.abs().max()), msg=f"step {step}")
    assert two["metrics"]["lsc_mask_fraction"] == one["metrics"]["lsc_mask_fraction"]
    assert two["metrics"]["rwp_steps_mean"] == one["metrics"]["rwp_steps_mean"]
    # an argmax could flip only at a top-2 logit gap within ~1e-15 of 0: none in a fixed fp64 case
    assert two["metrics"]["train_robust_acc"] == one["metrics"]["train_robust_acc"]
    assert math.isclose(two["metrics"]["train_robust_loss"], one["metrics"]["train_robust_loss"], rel_tol=RTOL)
    for k, v in one["eval"].items():  # accuracies exact, as above; the losses' sums: the same error model
        assert math.isclose(two["eval"][k], v, rel_tol=RTOL), k


def test_batchnorm_weights_bit_identical_on_every_process(traces):
    a, b = traces[0]["bn-at-rwp"]["weights"], traces[1]["bn-at-rwp"]["weights"]
    assert len(a) == 4
    for step, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {step}"
    assert not torch.equal(a[0], a[-1])  # it trained


def test_mask_empty_on_one_process_only_breaks_nowhere_alone(traces):
    r0, r1 = traces[0]["empty-mask"], traces[1]["empty-mask"]
    assert r0["local_count"] == 8 and r1["local_count"] == 0  # probe 1: rank 1's own mask is empty
    # rank 1 did not break at probe 1: it took the step with the global mask (8 of 16)
    assert r0["steps"] == r1["steps"] >= 1 and r0["mask"] == r1["mask"] and r0["mask"][0] == 0.5
    one = dist_worker.empty_mask_search(slice(0, 16))
    for run in (one, r0, r1):  # ln 10 by a wide margin, by construction; checked on every probe
        probes = Records(run["lsc_range"])
        probes.probe_losses = run["probe_losses"]
        assert_clear_of_thresholds(probes)
    assert r0["mask"] == one["mask"] and r0["steps"] == one["steps"]
    for a, b, c in zip(r0["v"], r1["v"], one["v"]):
        assert torch.equal(a, b) and c.dtype == torch.float64
        # fp64, the error model at RTOL (one step: the sums of 8 + 8 rows vs 16, the all-reduce)
        torch.testing.assert_close(a, c, rtol=RTOL, atol=RTOL * float(c.abs().max()))
    assert any(bool(v.abs().sum() > 0) for v in r0["v"])
    assert torch.equal(r0["weights"], r1["weights"])


TRAIN = ["--dataset", "digits", "--model", "small_cnn", "--epsilon", "32", "--alpha", "8", "--attack-steps", "2",
         "--eval-attack-steps", "2", "--perturb", "rwp", "--c-min", "2.3", "--k2", "2", "--epochs", "2",
         "--batch-size", "32", "--train-examples", "128", "--eval-examples", "64", "--lr", "0.05",
         "--lr-milestones", "1", "--device", "cpu", "--backend", "torch", "--quiet"]


def test_sigterm_to_one_process_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, log = launch([sys.executable, "-m", "rwp_fast", "train", "--nproc", "2", *TRAIN, "--out-dir", str(straight)])
    assert rc == 0, log[-4000:]
    # rank 1 alone gets SIGTERM after global step 6 = step 2 of epoch 2 (4 steps per epoch)
    rc, log = launch(TORCHRUN + [os.path.join(HERE, "dist_worker.py"), "preempt", "6", "--", "train", *TRAIN,
                                 "--out-dir", str(killed)])
    # under a bare torchrun each rank exits EXIT_PREEMPTED (75), so torchrun reports a failure: not "finished"
    assert rc != 0 and "75" in log, log[-4000:]
    assert "stopped by a signal at epoch 2 step 2" in log
    mid = torch.load(killed / "last.pt", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["position"]) == (1, 6, 2)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1
    rc, log = launch([sys.executable, "-m", "rwp_fast", "train", "--nproc", "2", "--resume", str(killed)])
    assert rc == 0, log[-4000:]
    assert log.count("resuming") == 1  # rank 0 only
    a, b = torch.load(straight / "last.pt", weights_only=True), torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8 and b["position"] == 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        for k in ("test_robust_acc", "test_natural_loss", "lsc_mask_fraction", "train_robust_acc", "step"):
            assert ra[k] == rb[k], k
        # the epoch's loss sum was reduced at the stop and again at the end: summation order only
        assert math.isclose(ra["train_robust_loss"], rb["train_robust_loss"], rel_tol=1e-6)


# ------------------------------------------------------------------------------ bad launches (no group)
def _setup(monkeypatch, env, device="cpu", **cfg):
    from rwp_fast.train import distributed
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **env}.items():
        monkeypatch.setenv(k, v)
    return distributed.setup(dist_worker.base_cfg(**cfg), torch.device(device))


def test_nccl_without_cuda_is_a_one_line_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"^RWP_FAST_DIST_BACKEND: the nccl backend needs CUDA") as e:
        _setup(monkeypatch, {"RWP_FAST_DIST_BACKEND": "nccl"})
    assert "\n" not in str(e.value)


def test_more_processes_than_gpus_on_a_node_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^nproc_per_node: 4 processes on this node but 2 GPU\(s\)"):
        _setup(monkeypatch, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, device="cuda")


def test_batch_not_divisible_is_a_one_line_error(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"^batch_size: the global batch 33 does not divide among 2 processes"):
        _setup(monkeypatch, {}, batch_size=33)
    from rwp_fast import cli  # --nproc checks it before starting any process
    assert cli.main(["train", "--nproc", "2", "--dataset", "digits", "--batch-size", "33", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rwp-fast train: error: batch_size: the global batch 33 does not divide among 2 processes; "
                   "allowed: a multiple of 2"]


def test_reference_backend_and_cpu_sync_bn_are_refused_with_many_processes(monkeypatch):
    with pytest.raises(ConfigError, match=r"^backend: 'reference' runs one process only"):
        _setup(monkeypatch, {}, backend="reference")
    with pytest.raises(ConfigError, match=r"^sync_bn: SyncBatchNorm runs on CUDA only"):
        _setup(monkeypatch, {}, sync_bn=True)


def test_checkpoint_from_another_model_is_a_one_line_error(tmp_path):
    from rwp_fast.train import CheckpointError, Trainer, save_checkpoint
    cfg = dist_worker.base_cfg(out_dir=str(tmp_path / "run"), epochs=1)
    state = Trainer(cfg).state_dict()   # small_cnn_gn weights, saved under a config that says small_cnn
    save_checkpoint(tmp_path / "run" / "last.pt", {**state, "config": cfg.replace(model="small_cnn").to_dict()})
    with pytest.raises(CheckpointError, match=r"its config says model small_cnn, but the weights are from "
                                              r"small_cnn_gn") as e:
        Trainer.resume(str(tmp_path / "run"))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ benchmarks
def test_comm_model_is_the_ring_formula_and_rwp_probes_add_traffic():
    from rwp_fast.bench import comm_model
    # bytes × 2(N − 1)/N ÷ bandwidth + latency: 1 GB over 4 GPUs at 1 GB/s = 1.5 s
    assert comm_model.allreduce_seconds(1e9, 4, 1e9, 0.0) == pytest.approx(1.5)
    params, weights, flops = comm_model.model_sizes("preact_resnet18")
    assert params == 11_172_170 and 0.99 * params < weights < params and flops > 1e9
    link = "100 Gb/s Ethernet"
    at, rwp = (comm_model.predict("preact_resnet18", k, 8, link, 128, 150.0) for k in (0, 10))
    # 10 probes: 10 more flat-gradient all-reduces (+ 10 count latencies)
    extra = 10 * (comm_model.allreduce_seconds(4 * weights, 8, 12.5e9, 50e-6) + 50e-6)
    assert rwp["comm_ms"] - at["comm_ms"] == pytest.approx(1e3 * extra)
    assert 0 < rwp["efficiency"] < at["efficiency"] < 1


def test_bench_nproc_smoke_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "dist.json"
    rc, log = launch([sys.executable, "-m", "bench", "--nproc", "2", "--smoke", "--device", "cpu", "--json", str(out)])
    assert rc == 0, log[-4000:]
    rows = json.loads(out.read_text())
    assert [(r["method"], r["nproc"]) for r in rows] == [("at", 2), ("at-rwp", 2)]
    assert all(r["note"] == "smoke, not a measurement" and r["images_per_s_1proc"] > 0 for r in rows)


# ------------------------------------------------------------------------------ one process
def test_sigterm_stops_a_single_process_run_at_a_step_boundary_and_resume_is_exact(tmp_path):
    """The same stop and resume without torchrun; with one process the metrics are exact too."""
    from rwp_fast.train import Trainer
    kw = dict(model="small_cnn", perturb="rwp", epochs=2, checkpoint_every_steps=3, eval_examples=32)
    straight = Trainer(dist_worker.base_cfg(out_dir=str(tmp_path / "a"), **kw), log=lambda *a: None)
    straight.fit()
    stopped = Trainer(dist_worker.base_cfg(out_dir=str(tmp_path / "b"), **kw), log=lambda *a: None)
    stopped.after_step = lambda t: os.kill(os.getpid(), signal.SIGTERM) if t.step == 5 else None
    stopped.fit()
    assert stopped.preempted and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    mid = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["position"]) == (1, 5, 1)
    resumed = Trainer.resume(str(tmp_path / "b"), log=lambda *a: None)
    resumed.fit()
    assert not resumed.preempted and resumed.step == 8
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # timings, and what counts this session's steps only (step_modes) or its first step (first_step_s)
    session = ("seconds", "images_per_second", "step_modes", "first_step_s")
    strip = lambda r: {k: v for k, v in r.items() if k not in session}
    rows = [[strip(json.loads(x)) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert rows[0] == rows[1]


def test_checkpoint_every_steps_writes_the_mid_epoch_position(tmp_path):
    from rwp_fast.train import Trainer
    t = Trainer(dist_worker.base_cfg(out_dir=str(tmp_path / "r"), checkpoint_every_steps=3), log=lambda *a: None)
    seen = []
    t.after_step = lambda t: seen.append(t.step)
    t.train_epoch()
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert seen == [1, 2, 3, 4] and (state["step"], state["position"]) == (3, 3)
    assert state["epoch_stats"]["images"] == 96


def test_a_run_stopped_by_a_signal_is_not_marked_done_by_a_sweep(tmp_path, monkeypatch):
    from rwp_fast import sweep
    from rwp_fast.train import Trainer

    def fit(self):
        self.preempted = True
        return []
    monkeypatch.setattr(Trainer, "fit", fit)
    cfg = dist_worker.base_cfg(out_dir=str(tmp_path / "p"))
    os.makedirs(cfg.out_dir)
    with pytest.raises(SystemExit) as stop:
        sweep.run_one(cfg, log=lambda *a: None)
    assert stop.value.code == EXIT_PREEMPTED
    assert not (tmp_path / "p" / sweep.DONE_FILE).exists()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_preemption_signal_to_the_nproc_launcher_stops_every_process_cleanly(tmp_path, sig):
    """What a scheduler does: signal `rwp-fast train --nproc 2` itself. torchrun does not handle SIGUSR1
    (it would die and orphan the ranks), so the launcher hands both signals on as SIGTERM; every process
    stops at a step boundary, rank 0 writes last.pt, and the launcher exits EXIT_PREEMPTED (75), not 0."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rwp_fast", "train", "--nproc", "2", *TRAIN, "--epochs", "200",
           "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=os.path.dirname(HERE))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "last.pt").exists():  # the first epoch's checkpoint: every rank is training
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never checkpointed"
            time.sleep(0.2)
        proc.send_signal(sig)
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == EXIT_PREEMPTED, log[-4000:]
    assert "stopped by a signal" in log, log[-4000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] < 200
