"""The captured mode of the fast step: its four phases as CUDA graphs that share one memory pool.

``PhaseGraphs`` records, once each, the phases of a warmed-up ``FastTrainStep`` (rwp_fast.train.fast_step):
the attack, the probe forward, the probe backward with its update, and the training step. A step is then
1 + F + B + 1 replays for F probe forwards and B probe backwards (B = F, or F − 1 after an empty mask),
with the count read between a forward and its backward, and a handful of eager ops around them: the batch
and noise copies, the lr, and the result's copies (``tests/test_captured_phases.py`` counts them).

Why capture is safe: every tensor a phase reads or writes outside its temporaries lives in a persistent
buffer (the batch, the noise, x_adv, the flat weights and gradients, the search state, the momentum
buffers), updated in place. The temporaries come from one pool, which graphs may share in any capture order
as long as no graph's live data spans another graph's replay: each phase's temporaries are dead when it
ends; the probe forward's saved activations live only until the probe backward, and nothing replays between
the two; and the loss, logits and masked mean that outlive their graph are outputs held here, never freed.

``EagerPhase`` runs a body at every replay instead of recording it: the CPU tests drive the very code that
the graphs capture through it, replay by replay.
"""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..attacks.pgd import frozen
from .phase_compile import exception_text

# Steps run compiled before the capture: Dynamo compiles at the 1st forward and the 1st backward, cuDNN
# benchmarks its algorithms; the 2nd runs warm. Capturing then records kernels, never compilations.
WARMUP_STEPS = 2


class CUDAGraphPhase:
    """One phase recorded as a CUDA graph; ``outputs`` are the static tensors of its capture."""

    def __init__(self, body, pool):
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # thread_local: the extra-data producer thread may allocate pinned memory meanwhile; under the
            # default 'global' mode that would abort this capture
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs = body()
        except BaseException:
            abandon_capture(self.graph, stream, pool)
            raise

    def replay(self):
        self.graph.replay()
        return self.outputs


def abandon_capture(graph, stream, pool):
    """Leave the process as it was before a capture that raised: the capture ended, `stream` current again,
    the allocator no longer routing this stream's allocations into the graph's pool.

    torch.cuda.graph's exit calls ``capture_end()`` and only then restores the stream: when ``capture_end``
    raises (an invalidated capture), the side stream it captured on stays current, and every later kernel
    of the process would queue there. Each step is tried on its own, since any may already have happened."""
    if torch.cuda.is_current_stream_capturing():
        try:
            graph.capture_end()
        except Exception:  # noqa: BLE001 - the capture is being abandoned; its first error is the one raised
            pass
    torch.cuda.set_stream(stream)
    try:
        torch._C._cuda_endAllocateToPool(stream.device_index, pool if pool is not None else graph.pool())
    except Exception:  # noqa: BLE001 - raises when capture_end already ended the routing, as it does normally
        pass


class EagerPhase:
    """A phase run eagerly at each replay (CPU tests); ``replays`` counts them."""

    def __init__(self, body, pool=None):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1
        return self.body()


class PhaseGraphs:
    """The phases of `step` as graphs (phase=CUDAGraphPhase) or driven eagerly (EagerPhase), captured unit by
    unit once warm: the attack, the probe (forward and backward together: the backward graph replays what the
    forward's capture recorded for autograd) and the training step. A unit is warm after `warmup` uncaptured
    runs (``step.phase_runs``), so its compilations are behind it: Dynamo refuses to compile during a capture.
    Until then it runs uncaptured. A run whose masks stay empty never warms the probe backward, and its probes
    stay uncaptured (and cost a forward each)."""

    def __init__(self, step, phase=CUDAGraphPhase, warmup=WARMUP_STEPS):
        self.step, self.phase, self.warmup = step, phase, warmup
        self.pool = torch.cuda.graph_pool_handle() if phase is CUDAGraphPhase else None
        self.attack = self.probe_forward = self.probe_backward = self.train = self._masked_mean = None
        self.last_step_mode = None  # 'captured' or 'captured-partial': FastTrainStep.mode_counts

    def capture_warm(self):
        """Capture every unit that is warm and not yet captured. Capturing launches nothing."""
        step, runs, phase = self.step, self.step.phase_runs, self.phase
        if self.attack is None and runs["attack"] >= self.warmup:
            self.attack = phase(step.attack, self.pool)
        if step.perturbation is not None and self.probe_forward is None and runs["probe"] >= self.warmup:
            with frozen(step.flat.other_params):  # as during the search: the flat gradient only
                forward = phase(step.run_probe_forward, self.pool)
                self._masked_mean = getattr(forward, "outputs", None)  # captured: the static output
                self.probe_backward = phase(lambda: step.probe_backward(self._masked_mean), self.pool)
                self.probe_forward = forward
        if self.train is None and runs["train"] >= self.warmup:
            self.train = phase(step.train, self.pool)

    def _forward(self):
        self._masked_mean = self.probe_forward.replay()
        return self._masked_mean

    def _backward(self, masked_mean):
        self.probe_backward.replay()
        return True

    def __call__(self, x, y, perturb_active, generator):
        step = self.step
        step._load(x, y, generator)
        self.attack.replay() if self.attack is not None else step.attack()
        captured = self.probe_forward is not None
        info = step.search(perturb_active, y.shape[0], self._forward if captured else None,
                           self._backward if captured else None)
        v = step.perturbation.v_tensors() if step.keep_v and step.perturbation is not None else None
        loss, logits = self.train.replay() if self.train is not None else step.train()
        # every unit that ran was a replay, or some ran uncaptured (a unit not yet warm: the probes of a run
        # whose masks stayed empty, or before perturbation starts)
        whole = self.attack is not None and self.train is not None and (captured or not info.mask_fractions)
        self.last_step_mode = "captured" if whole else "captured-partial"
        return step.result(loss, logits, v, info)


def run_captured(step, x, y, perturb_active, generator):
    """One step of a FastTrainStep in captured mode. Until the attack and the training step are warm, whole
    steps run compiled on a side stream; then each warm unit is captured (``PhaseGraphs``). A capture that
    raises leaves the step compiled for good (one warning with the whole cause): a capture launches no
    kernel, so the training state is untouched, and ``abandon_capture`` restores the stream and the pool.
    Returns None when the caller should run the step itself."""
    if step.graphs is None and min(step.phase_runs["attack"], step.phase_runs["train"]) < WARMUP_STEPS:
        side = torch.cuda.Stream(device=step.device)
        side.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(side):
            result = step.run_uncaptured(x, y, perturb_active, generator, None)
        torch.cuda.current_stream(step.device).wait_stream(side)
        return result
    try:
        if step.graphs is None:
            step.graphs = PhaseGraphs(step)
        step.graphs.capture_warm()
    except Exception as exc:  # noqa: BLE001 - capture errors only: CUDAGraphPhase restored stream and pool
        step.warn(f"capture failed; running the compiled phases from now on. The whole cause:\n"
                  f"{exception_text(exc)}")
        step.graphs = None
        step.mode = "compiled" if any(p.level != "eager" for p in step.phases.values()) else "eager"
        return None
    return step.graphs(x, y, perturb_active, generator)


# ------------------------------------------------------------------------------------ launch proxy
class AtenOpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (eager: on CUDA ≈ one kernel launch per op).

    ``total`` is the number of calls; ``by_op`` a Counter by overload name. Views and metadata-only ops
    are counted too: they cost host time, if no kernel.
    """

    def __init__(self):
        super().__init__()
        self.by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.by_op.values())


def count_aten_ops(fn, *args, **kwargs):
    """(result, AtenOpCounter) of one call of fn(*args, **kwargs) under the counter."""
    with AtenOpCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter
