"""The captured mode of the fast step: its four phases as CUDA graphs that share one memory pool.

``PhaseGraphs`` records, once, each phase of a warmed-up ``FastTrainStep`` (rwp_fast.train.fast_step):
the attack, the probe forward, the probe backward with its update, and the training step. A step is then
1 + F + B + 1 replays for F probe forwards and B probe backwards (B = F, or F − 1 after an empty mask),
with the count read between a forward and its backward, and a handful of eager ops around them: the batch
and noise copies, the lr, and the result's copies (``test_cuda_graphs`` counts them).

Why capture is safe: every tensor a phase reads or writes outside its temporaries lives in a persistent
buffer (the batch, the noise, x_adv, the flat weights and gradients, the search state, the momentum
buffers), updated in place. The temporaries come from one pool. Graphs that share a pool must replay in the
order they were captured, and each phase's temporaries are dead by the time a later phase runs; the probe
forward's saved activations stay alive, held by its output, until the probe backward graph consumes them,
and the loss, logits and count that the host reads are outputs held here, so no later graph reuses them.

``EagerPhase`` runs a body at every replay instead of recording it: the CPU tests drive the very code that
the graphs capture through it, replay by replay.
"""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..attacks.pgd import frozen

# Steps run compiled before the capture: Dynamo compiles at the 1st forward and the 1st backward, cuDNN
# benchmarks its algorithms; the 2nd runs warm. Capturing then records kernels, never compilations.
WARMUP_STEPS = 2


class CUDAGraphPhase:
    """One phase recorded as a CUDA graph; ``outputs`` are the static tensors of its capture."""

    def __init__(self, body, pool):
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the extra-data producer thread may allocate pinned memory meanwhile; under the
        # default 'global' mode that would abort this capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = body()

    def replay(self):
        self.graph.replay()
        return self.outputs


class EagerPhase:
    """A phase run eagerly at each replay (CPU tests); ``replays`` counts them."""

    def __init__(self, body, pool=None):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1
        return self.body()


class PhaseGraphs:
    """The four phases of `step` captured (phase=CUDAGraphPhase) or driven eagerly (EagerPhase)."""

    def __init__(self, step, phase=CUDAGraphPhase):
        self.step = step
        pool = torch.cuda.graph_pool_handle() if phase is CUDAGraphPhase else None
        self.attack = phase(step.attack, pool)
        self.probe_forward = self.probe_backward = self._masked_mean = None
        if step.perturbation is not None:
            with frozen(step.flat.other_params):  # as during the search: the flat gradient only
                self.probe_forward = phase(step.run_probe_forward, pool)
                self._masked_mean = getattr(self.probe_forward, "outputs", None)  # captured: the static output
                self.probe_backward = phase(lambda: step.probe_backward(self._masked_mean), pool)
        self.train = phase(step.train, pool)

    def _forward(self):
        self._masked_mean = self.probe_forward.replay()
        return self._masked_mean

    def _backward(self, masked_mean):
        self.probe_backward.replay()
        return True

    def __call__(self, x, y, perturb_active, generator):
        step = self.step
        step._load(x, y, generator)
        self.attack.replay()
        info = step.search(perturb_active, y.shape[0], self._forward, self._backward)
        v = step.perturbation.v_tensors() if step.keep_v and step.perturbation is not None else None
        loss, logits = self.train.replay()
        return step.result(loss, logits, v, info)


def run_captured(step, x, y, perturb_active, generator):
    """One step of a FastTrainStep in captured mode. The first WARMUP_STEPS run compiled on a side stream;
    then the phases are captured. A capture that raises leaves the step compiled for good (one warning):
    nothing ran, so no state needs restoring. Returns None when the caller should run the step itself."""
    if step.graphs is None and step.steps_run < WARMUP_STEPS:
        side = torch.cuda.Stream(device=step.device)
        side.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(side):
            result = step.run_uncaptured(x, y, perturb_active, generator, None)
        torch.cuda.current_stream(step.device).wait_stream(side)
        return result
    if step.graphs is None:
        try:
            step.graphs = PhaseGraphs(step)
        except Exception as exc:  # noqa: BLE001 - capture errors only: the capture launches nothing
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            step.warn(f"capture failed ({type(exc).__name__}: {detail}); running the compiled phases")
            step.mode = "compiled"
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
