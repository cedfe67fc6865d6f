"""A compile or capture failure never crashes a run and is never hidden (rwp_fast/train/phase_compile.py,
rwp_fast/train/graphs.py):

* a phase that does not compile with fullgraph warns once with the whole cause (the traceback, not its
  first line), runs on with graph breaks allowed, repeats nothing that ran, and the step still computes the
  reference step in fp64;
* an error of the body itself is not taken for a compile failure;
* every step counts the mode it really ran in (``FastTrainStep.mode_counts``);
* a capture whose exit raises before it restores the stream leaves the stream and the pool as they were.

Compiles with backend ``aot_eager`` (the same Dynamo graphs as Inductor, without minutes of C++)."""

import pytest
import torch

from equivalence import CASES, assert_equivalent, make_cfg, run_pair
from rwp_fast.train import fast_step as fast_step_module
from rwp_fast.train import graphs
from rwp_fast.core import PhaseFallbackWarning
from rwp_fast.train.phase_compile import PhaseFunction


@pytest.fixture
def aot_eager(monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _breaking_body(buf):
    buf.add_(1.0)
    torch._dynamo.graph_break()  # what a torch we do not test, or a user's model, might hit
    buf.mul_(2.0)
    return buf.sum()


def test_a_phase_that_breaks_fullgraph_warns_the_whole_cause_and_runs_on_once(aot_eager):
    phase = PhaseFunction(_breaking_body, "probe_forward")
    buf = torch.arange(5, dtype=torch.float64)
    with pytest.warns(PhaseFallbackWarning) as caught:
        total = phase(buf)
    assert len(caught) == 1
    message = str(caught[0].message)
    # the whole cause: the traceback and the user-code frame, not only the exception's first line
    assert "Traceback (most recent call last)" in message and "graph_break" in message, message
    assert "_breaking_body" in message
    # nothing ran twice: (x + 1)·2 once, not ((x + 1) + 1)·2
    assert torch.equal(buf, (torch.arange(5, dtype=torch.float64) + 1) * 2)
    assert float(total) == float(buf.sum())
    assert phase.level == "graph-breaks" and phase.fallback.startswith("probe_forward: fullgraph failed (")
    again = torch.zeros(5, dtype=torch.float64)
    phase(again)  # no second warning (the filter makes one an error)
    assert torch.equal(again, torch.full((5,), 2.0, dtype=torch.float64))


def test_an_error_of_the_body_reaches_the_caller_as_itself(aot_eager):
    """Dynamo reports a body's own raise as Unsupported ('Observed exception') while tracing, before anything
    ran: the phase falls back (warning), and the retry raises the body's own error, type and message."""
    def body(buf):
        if buf.shape[0] == 3:
            raise ValueError("x: the body's own error")
        return buf + 1

    phase = PhaseFunction(body, "train_forward")
    with pytest.warns(PhaseFallbackWarning), pytest.raises(ValueError, match="the body's own error"):
        phase(torch.zeros(3))


def test_a_phase_that_compiles_stays_fullgraph(aot_eager):
    phase = PhaseFunction(lambda buf: buf.mul_(3.0), "update")
    buf = torch.ones(4)
    phase(buf)
    assert phase.level == "fullgraph" and phase.fallback is None and torch.equal(buf, torch.full((4,), 3.0))


def test_the_fast_step_falls_back_computes_the_reference_and_records_the_mode(aot_eager, monkeypatch):
    """The attack step made to break fullgraph (as 2.11 did before the persistent leaf): one warning, the
    steps equal the reference in fp64, and each step counts as 'compiled-graph-breaks'."""
    real_ascend = fast_step_module.ascend_

    def ascend_with_a_break(*args):
        torch._dynamo.graph_break()
        return real_ascend(*args)

    monkeypatch.setattr(fast_step_module, "ascend_", ascend_with_a_break)
    cfg = make_cfg("torch", **CASES["at-rwp-paper-layer"], compile=True)
    steps = []
    with pytest.warns(PhaseFallbackWarning, match="phase 'attack_step'") as caught:
        records = run_pair(cfg, steps=2, record=False, mutate=steps.append)
    assert len(caught) == 1
    assert_equivalent(records)
    (step,) = steps
    assert step.mode_counts == {"compiled-graph-breaks": 2}
    assert len(step.fallbacks) == 1 and step.fallbacks[0].startswith("attack_step: fullgraph failed")


@pytest.mark.parametrize("compile_phases,mode", [(False, "eager"), (True, "compiled")])
def test_each_step_counts_the_mode_it_ran_in(compile_phases, mode, aot_eager):
    cfg = make_cfg("torch", **CASES["at-awp"], compile=compile_phases)
    steps = []
    run_pair(cfg, steps=2, record=False, mutate=steps.append)
    assert steps[0].mode_counts == {mode: 2} and steps[0].fallbacks == []


def _failing_backward_backend():
    """aot_eager whose backward compiler raises, as an Inductor codegen failure of a backward would."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_fails(gm, example_inputs):
        raise RuntimeError("backward codegen failed")

    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=backward_fails)


def test_a_backward_that_does_not_compile_falls_back_before_the_forward_runs(monkeypatch):
    """The backward of a differentiating phase compiles with its forward, inside the phase call: its
    failure falls back there, before the forward ran, and the host's .backward() then works."""
    real_compile = torch.compile
    backend = _failing_backward_backend()
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend=backend, **kw))
    torch._dynamo.reset()
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    phase = PhaseFunction(lambda x: (w * x).sum(), "train_forward")
    with pytest.warns(PhaseFallbackWarning, match="backward codegen failed"):
        loss = phase(torch.ones(3))
    loss.backward()
    assert torch.equal(w.grad, torch.ones(3)) and phase.level == "graph-breaks"
    torch._dynamo.reset()


def test_a_failure_with_graph_breaks_allowed_from_the_start_is_raised_not_retried(monkeypatch):
    """A multi-process run's phases start with graph breaks allowed: there a part may have run before a
    failure, so it is raised, never retried nor swallowed into eager."""
    real_compile = torch.compile
    backend = _failing_backward_backend()
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend=backend, **kw))
    torch._dynamo.reset()
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    phase = PhaseFunction(lambda x: (w * x).sum(), "train_forward", fullgraph=False)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="backward codegen failed"):
        phase(torch.ones(2))
    assert phase.fallback is None and phase.level == "graph-breaks"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- a capture that raises
class _FakeCUDA:
    """torch.cuda's stream and capture state. Its graph context exits as torch 2.11's does: capture_end()
    first, the stream restored only after it; here capture_end raises (an invalidated capture)."""

    def __init__(self):
        self.stream, self.capturing, self.ended_pool = "main", False, None

    def graph(self, graph, pool=None, capture_error_mode="global"):
        fake = self

        class Capture:
            def __enter__(self):
                fake.stream, fake.capturing = "capture-side-stream", True

            def __exit__(self, *exc):
                graph.capture_end()  # raises: the line that would restore the stream is never reached
                fake.stream = "main"
        return Capture()


def test_a_capture_whose_exit_raises_restores_the_stream_and_the_pool(monkeypatch):
    fake = _FakeCUDA()

    class FakeGraph:
        ends = 0

        def capture_end(self):  # the first call fails with the capture still open, a second one ends it
            self.ends += 1
            if self.ends == 1:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            fake.capturing = False

        def pool(self):
            return (0, 7)

    class FakeStream:
        device_index = 0

        def __eq__(self, other):
            return other == "main"

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: fake.capturing)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(fake, "stream", "main" if s == "main" else s))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda dev, pool: setattr(fake, "ended_pool", pool),
                        raising=False)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        graphs.CUDAGraphPhase(lambda: torch.zeros(1), pool=(0, 3))
    assert fake.stream == "main" and not fake.capturing and fake.ended_pool == (0, 3)


def test_a_failed_capture_warns_the_whole_exception_chain(monkeypatch):
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"])
    steps = []

    def capture_fails(step):
        def fail(*args, **kwargs):
            try:
                raise OSError("the inner cause")
            except OSError as inner:
                raise RuntimeError("capture refused") from inner

        step.mode = "captured"
        step.phase_runs.update(attack=2, train=2)  # as after the warm-up
        monkeypatch.setattr(graphs, "PhaseGraphs", fail)
        steps.append(step)

    with pytest.warns(RuntimeWarning, match="capture failed") as caught:
        records = run_pair(cfg, steps=2, mutate=capture_fails)
    (warning,) = [w for w in caught if "capture failed" in str(w.message)]
    assert "the inner cause" in str(warning.message) and "capture refused" in str(warning.message)
    assert "direct cause" in str(warning.message)
    assert_equivalent(records)
    # compile is off here: the step goes on as it really runs, eager (not labelled compiled)
    assert steps[0].mode == "eager" and steps[0].mode_counts == {"eager": 2}


def _drive_eagerly(step, probes=True):
    """Captured mode with EagerPhase units (as tests/test_captured_phases.py), all of them or all but the
    probe unit (as while it is not yet warm)."""
    step.graphs = graphs.PhaseGraphs(step, phase=graphs.EagerPhase, warmup=0)
    step.mode = "captured"
    if not probes:
        step.graphs.capture_warm = lambda: None
        step.graphs.attack = graphs.EagerPhase(step.attack)
        step.graphs.train = graphs.EagerPhase(step.train)


@pytest.mark.parametrize("probes,mode", [(True, "captured"), (False, "captured-partial")])
def test_a_captured_step_counts_whether_every_unit_replayed(probes, mode):
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"], compile_mode="cuda-graphs")
    steps = []
    records = run_pair(cfg, steps=2, capture=False, mutate=lambda s: (_drive_eagerly(s, probes), steps.append(s)))
    assert_equivalent(records)
    assert steps[0].mode_counts == {mode: 2}
