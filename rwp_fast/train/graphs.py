"""Launch overhead: the ``cuda-graphs`` training mode, and the aten-op count used as its CPU proxy.

``StaticStep`` runs the attack and the RWP probes of a ``FastTrainStep`` over static buffers (x, y,
x_adv, and the probe state of ``WeightPerturbation``), as two bodies:

* ``attack_body``: the whole K1-step PGD (or TRADES) attack, random start included, from ``self.x``,
  ``self.y`` into ``self.x_adv``, drawing from one generator (``self.generator``) whose state is set
  from the caller's generator every step;
* ``probe_body``: one stall-free RWP probe (forward, masked loss, backward into the flat gradient, the
  gated ``weight_perturb`` update), replayed up to K2 times by ``WeightPerturbation.search``.

With ``capture=True`` (CUDA) each body is captured once into a ``torch.cuda.CUDAGraph`` and replayed;
with ``capture=False`` the same bodies run eagerly. That is how the CPU tests hold the code that the
graphs capture to the reference step by step: the capture itself is the thin layer ``_capture``.

Why this is capture-safe: every tensor a body reads or writes outside its own temporaries has a fixed
address. The perturbed weights and their gradients live in ``FlatWeights`` buffers updated in place; a,
s, ‖w‖², ‖a‖², the probe counts and the BN snapshot are allocated once in ``WeightPerturbation``; the
bodies copy into x_adv and the probe count instead of rebinding; the probes freeze every parameter
outside the flat buffer, so their backward touches no other ``.grad``; and the random start draws from a
generator registered with the attack graph (``CUDAGraph.register_generator_state``, torch >= 2.5), so a
replay after ``generator.set_state`` draws what an eager step seeded the same way draws.
"""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Eager iterations on a side stream before capture: cuDNN autotuning, lazy CUDA init, and (compiled
# forward) dynamo's first compilations must not happen inside the capture.
WARMUP_ITERS = 3


class StaticStep:
    """Attack and probe of `fast_step` over static buffers shaped like (x, y); see the module docstring."""

    def __init__(self, fast_step, x, y, capture):
        self.fs = fast_step
        self.x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        self.x_adv = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.generator = torch.Generator(device=x.device)
        self.attack_graph = self.probe_graph = None
        if capture:
            self.x.copy_(x)
            self.y.copy_(y)
            self._capture()

    def matches(self, x, y):
        return (x.shape, x.dtype, y.shape, y.dtype) == (self.x.shape, self.x.dtype, self.y.shape, self.y.dtype)

    def persistent_tensors(self):
        return {"static.x": self.x, "static.y": self.y, "static.x_adv": self.x_adv}

    # ------------------------------------------------------------------------------------- bodies
    def attack_body(self):
        self.x_adv.copy_(self.fs.adversarial_examples(self.x, self.y, self.generator))

    def probe_body(self):
        fs = self.fs
        fs.perturbation.probe_step(lambda: fs.losses(self.x, self.x_adv, self.y, fs.cfg.lsc_range)[:4])

    def run_attack(self):
        if self.attack_graph is not None:
            self.attack_graph.replay()
        else:
            self.attack_body()

    def run_probe(self):
        if self.probe_graph is not None:
            self.probe_graph.replay()
        else:
            self.probe_body()

    # ---------------------------------------------------------------------------------------- step
    def __call__(self, x, y, perturb_active, generator):
        """One training step through the static buffers.

        The StepResult's x_adv is a copy (one 1.5 MB copy at CIFAR b128: negligible next to the step), so
        that callers may keep it across steps like the eager step's. Without a generator the
        random start draws from the device's default generator, as the eager step does, so
        ``torch.manual_seed`` governs it.
        """
        self.x.copy_(x)
        self.y.copy_(y)
        if generator is None:
            generator = (torch.cuda.default_generators[x.device.index if x.device.index is not None
                                                       else torch.cuda.current_device()]
                         if x.is_cuda else torch.default_generator)
        self.generator.set_state(generator.get_state())
        self.run_attack()
        generator.set_state(self.generator.get_state())  # the caller's generator advances as if it drew
        result = self.fs.step_after_attack(self.x, self.y, self.x_adv, perturb_active, run_probe=self.run_probe)
        result.x_adv = self.x_adv.clone()
        return result

    # ------------------------------------------------------------------------------------- capture
    def _capture(self):
        """Warm up on a side stream, capture both bodies, and undo what the warm-up changed."""
        fs = self.fs
        perturbation = fs.perturbation
        probes = fs.cfg.effective_k2 > 0
        saved = [t.clone() for t in fs.state_tensors()]
        gen_state = self.generator.get_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_ITERS):
                    self.attack_body()
                    if probes:
                        perturbation.begin()
                        self.probe_body()
                        perturbation.restore_buffers()
                        perturbation.a.zero_()
            torch.cuda.current_stream().wait_stream(side)
            self.attack_graph = torch.cuda.CUDAGraph()
            self.attack_graph.register_generator_state(self.generator)
            with torch.cuda.graph(self.attack_graph):
                self.attack_body()
            if probes:  # plain AT takes no probe: capturing one would only hold a memory pool
                perturbation.begin()
                self.probe_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.probe_graph):
                    self.probe_body()
        finally:
            torch.cuda.synchronize()
            for dst, src in zip(fs.state_tensors(), saved):
                dst.copy_(src)
            self.generator.set_state(gen_state)


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
