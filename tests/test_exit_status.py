"""The exit statuses of rwp-fast (config.EXIT_*): a run stopped by SIGTERM / SIGUSR1 writes last.pt and exits
EXIT_PREEMPTED (75), which a job chain reads as "resubmit with --resume", not 0 ("finished")."""

import os
import signal

import pytest
import torch

from rwp_fast.cli import main
from rwp_fast.config import EXIT_PREEMPTED
from rwp_fast.train import Trainer, distributed

TINY = ["--dataset", "digits", "--epochs", "2", "--attack-steps", "1", "--eval-attack-steps", "1",
        "--train-examples", "96", "--eval-examples", "16", "--batch-size", "32", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stopped_run_exits_75_with_last_pt_then_resumes_to_0(tmp_path, monkeypatch, capsys, sig):
    monkeypatch.delenv(distributed.STOP_FILE_ENV, raising=False)
    original = Trainer.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.after_step = lambda t: os.kill(os.getpid(), sig) if t.step == 2 else None
    monkeypatch.setattr(Trainer, "__init__", init)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out-dir", str(out)]) == EXIT_PREEMPTED
    assert "stopped by a signal at epoch 1 step 2" in capsys.readouterr().out
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["position"]) == (0, 2, 2)
    monkeypatch.setattr(Trainer, "__init__", original)
    assert main(["train", "--resume", str(out)]) == 0   # finished: the loop stops resubmitting
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_under_the_nproc_launcher_rank_0_tells_it_and_every_rank_exits_0(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    stop_file.write_text("")
    monkeypatch.setenv(distributed.STOP_FILE_ENV, str(stop_file))
    assert distributed.preempted_status(is_main=False) == 0 and stop_file.read_text() == ""
    assert distributed.preempted_status(is_main=True) == 0 and stop_file.read_text().strip() == "preempted"
    monkeypatch.delenv(distributed.STOP_FILE_ENV)
    assert distributed.preempted_status(is_main=True) == EXIT_PREEMPTED


def test_a_parallel_sweep_whose_children_were_stopped_exits_75(tmp_path, monkeypatch):
    """--parallel: a child that exits 75 is a run stopped with last.pt written, not a failed one."""
    import subprocess

    from rwp_fast.config import RunConfig
    from rwp_fast.sweep import run as sweep_run

    class Stopped:  # a child process that has exited EXIT_PREEMPTED
        returncode = EXIT_PREEMPTED

        def __init__(self, *a, **kw):
            pass

        def poll(self):
            return self.returncode
    monkeypatch.setattr(subprocess, "Popen", Stopped)
    todo = [RunConfig(out_dir=str(tmp_path / name)) for name in ("a", "b")]
    said = []
    assert sweep_run.run_parallel(todo, 2, log=said.append, poll_s=0) == ([], [c.out_dir for c in todo])
    assert sum("STOPPED" in s for s in said) == 2 and not any("FAILED" in s for s in said)
    # and the sweep, once its summary is written, exits 75 for them (1 if any run failed)
    from rwp_fast.sweep import build_sweep
    sweep = build_sweep(RunConfig(), str(tmp_path / "sw"), [("k2", [1, 2])])
    monkeypatch.setattr(sweep_run, "run_parallel", lambda todo, parallel, log: ([], [c.out_dir for c in todo]))
    monkeypatch.setattr(sweep_run, "summarize", lambda directory, log: [])
    with pytest.raises(SystemExit) as stop:
        sweep_run.run_sweep(sweep, parallel=2, log=said.append)
    assert stop.value.code == EXIT_PREEMPTED
    monkeypatch.setattr(sweep_run, "run_parallel", lambda todo, parallel, log: (["x"], ["y"]))
    assert sweep_run.run_sweep(sweep, parallel=2, log=said.append) == ([], ["x", "y"])
