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
from rwp_fast.train.phase_compile import PhaseFallbackWarning, PhaseFunction


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


# ------------------------------------------------------------------------------- a capture that raises
class _FakeCUDA:
    """torch.cuda's stream and capture state, as a capture whose exit raises in capture_end leaves it."""

    def __init__(self):
        self.stream, self.capturing, self.ended_pool = "main", False, None

    def graph(self, graph, pool=None, capture_error_mode="global"):
        fake = self

        class Capture:
            def __enter__(self):
                fake.stream, fake.capturing = "capture-side-stream", True

            def __exit__(self, *exc):
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")  # before
                # the stream is restored, as torch.cuda.graph.__exit__ does when capture_end raises
        return Capture()


def test_a_capture_whose_exit_raises_restores_the_stream_and_the_pool(monkeypatch):
    fake = _FakeCUDA()

    class FakeGraph:
        def capture_end(self):
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
    assert steps[0].mode == "compiled" and steps[0].mode_counts == {"eager": 2}
