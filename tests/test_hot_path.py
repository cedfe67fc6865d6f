"""Hot-path budgets of the fast training step, asserted on CPU (issue 10 §5).

On a GPU every device→host read (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, a data-dependent
shape) stalls the launch queue until the GPU has caught up; a graph break or a recompile under
``torch.compile`` costs a Python round trip or seconds of compilation. Neither shows up as an error, so
these tests count them, on CPU, through the public ``FastTrainStep``:

* device→host reads in one step (after a warm-up step): 0 for AT, one per probe forward for AWP and
  RWP (its count, for the exact early break), and none inside the attack;
* ``torch.compile`` (backend ``aot_eager``: the same Dynamo graphs as inductor without minutes of C++
  compilation) of the fast step's phases, with fullgraph: 0 graph breaks, and no new graph (no recompile)
  after the first step, with the torch ops and with the Triton ops (interpreter).
"""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import equivalence
from rwp_fast.config import RunConfig
from rwp_fast.models import build_model
from rwp_fast.train.fast_step import FastTrainStep

# Ops that read device memory on the host: .item()/bool()/int()/float() all dispatch
# _local_scalar_dense; nonzero and masked_select size their output from the data. .tolist() reads
# the storage directly (no dispatch), so it is counted by wrapping the method.
HOST_READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default}

CASES = {
    "at": dict(method="at", perturb="none"),
    "at-awp": dict(method="at", perturb="awp"),
    "at-rwp": dict(method="at", perturb="rwp"),
    "trades-rwp": dict(method="trades", perturb="rwp", c_min=2.45),
}


def make_cfg(**kw):
    base = dict(dataset="digits", model="small_cnn", epsilon_255=32.0, alpha_255=8.0, attack_steps=3, gamma=0.05,
                c_min=2.33, k2=4, lr=0.05, momentum=0.9, weight_decay=5e-4, backend="torch", precision="fp32",
                compile=False, channels_last=False, device="cpu")
    base.update(kw)
    return RunConfig(**base).validate()


def make_step(cfg):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, opt, FastTrainStep(model, opt, cfg, "cpu")


def batches(n):
    data = torch.Generator().manual_seed(1)
    return [(torch.rand(24, 1, 8, 8, generator=data), torch.randint(0, 10, (24,), generator=data))
            for _ in range(n)]


class HostReads(TorchDispatchMode):
    """Counts host reads, split into those inside the attack and the rest."""

    def __init__(self):
        super().__init__()
        self.in_attack = False
        self.active = False
        self.counts = collections.Counter()

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def record(self, what):
        self.counts[("attack" if self.in_attack else "step", what)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_OPS:
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def total(self, where=None):
        return sum(n for (w, _), n in self.counts.items() if where is None or w == where)


@pytest.fixture
def host_reads(monkeypatch):
    """A HostReads counter; .tolist() is wrapped so that it counts too."""
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        if reads.active:
            reads.record("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    return reads


def instrument(step, reads, monkeypatch):
    """Mark the attack in `reads`, and count the RWP/AWP probes (every losses() call but the last)."""
    attack = step.attack
    losses = step.losses
    calls = {"losses": 0}

    def marked_attack(*args, **kwargs):
        reads.in_attack = True
        try:
            return attack(*args, **kwargs)
        finally:
            reads.in_attack = False

    def counted_losses(*args, **kwargs):
        calls["losses"] += 1
        return losses(*args, **kwargs)

    monkeypatch.setattr(step, "attack", marked_attack)
    monkeypatch.setattr(step, "losses", counted_losses)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_host_reads_per_step(case, host_reads, monkeypatch):
    cfg = make_cfg(**CASES[case])
    model, opt, step = make_step(cfg)
    (x0, y0), (x1, y1) = batches(2)
    step(model, opt, x0, y0, cfg, generator=torch.Generator().manual_seed(5))  # warm-up: lazy state
    calls = instrument(step, host_reads, monkeypatch)
    with host_reads:
        result = step(model, opt, x1, y1, cfg, generator=torch.Generator().manual_seed(6))
    probes = calls["losses"] - 1  # the last losses() call is the training loss at w + v
    assert host_reads.total("attack") == 0, host_reads.counts
    if cfg.perturb != "none":  # one count read per probe forward: the exact early break
        assert probes == len(result.search.mask_fractions) and 1 <= probes <= cfg.effective_k2
        assert host_reads.total() == probes, (host_reads.counts, probes)
    else:
        assert host_reads.total() == 0, host_reads.counts


def test_host_read_counter_catches_a_sync(host_reads, monkeypatch):
    """The counter sees .item(), bool(t) and .tolist() (the mutations a hot-path change would add)."""
    t = torch.ones(3)
    with host_reads:
        t.sum().item()
        bool(t[0] > 0)
        t.tolist()
    assert host_reads.total() == 3, host_reads.counts


# ------------------------------------------------------------------------------- torch.compile budgets
@pytest.fixture
def aot_eager_compile(monkeypatch):
    """FastTrainStep compiles with torch.compile(model, mode=...); run that with backend='aot_eager'."""
    real_compile = torch.compile

    def compile_aot_eager(model, mode=None, **kwargs):
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dynamo_state():
    counters = torch._dynamo.utils.counters
    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
            dict(counters["graph_break"]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["at-rwp", "trades-rwp"])
def test_compiled_fast_step_has_no_graph_break_and_no_recompile(case, backend, aot_eager_compile, require_backend):
    """Every phase body compiles with fullgraph=True (a break would raise), and none recompiles."""
    if backend == "triton":
        require_backend("triton")
    cfg = make_cfg(**CASES[case], compile=True, backend=backend)
    model, opt, step = make_step(cfg)
    assert step.mode == "compiled"
    torch._dynamo.utils.counters.clear()
    data = batches(3)
    x, y = data[0]
    step(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(10))
    graphs_after_first, breaks, reasons = _dynamo_state()
    assert graphs_after_first >= 1, "nothing was compiled: the test does not exercise torch.compile"
    assert breaks == 0, reasons
    for i, (x, y) in enumerate(data[1:], start=1):
        with contextlib.nullcontext():
            step(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(10 + i))
    graphs, breaks, reasons = _dynamo_state()
    assert breaks == 0, reasons
    assert graphs == graphs_after_first, f"{graphs - graphs_after_first} recompile(s) after the first step"


@pytest.mark.parametrize("case", ["at-rwp-paper-layer", "trades-rwp", "at-awp"])
def test_compiled_phases_equal_the_reference_in_fp64(case, aot_eager_compile):
    """What Dynamo and AOT autograd make of the phases (aliased flat-buffer views mutated in place, the
    traced attack gradient, the SGD update) computes the reference step: fp64, 3 free-running steps."""
    cfg = equivalence.make_cfg("torch", **equivalence.CASES[case], compile=True)
    # record=False: the probe-loss recorder appends to a list inside the compiled region (a recompile per
    # call); the eager equivalence tests check those losses' distance from the thresholds for these cases.
    equivalence.assert_equivalent(equivalence.run_pair(cfg, steps=3, record=False))


@pytest.mark.slow
def test_compiled_phases_equal_the_reference_with_inductor():
    """The real backend, not aot_eager: Inductor's C++ code for every phase (TRADES-RWP runs all seven)
    computes the reference step in fp64, with no fullgraph fallback (the suite makes one an error) and no
    graph break. On the floor torch this is the GPU machine's Dynamo and Inductor, short of the GPU codegen."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = equivalence.make_cfg("torch", **equivalence.CASES["trades-rwp"], compile=True)
    steps = []
    equivalence.assert_equivalent(equivalence.run_pair(cfg, steps=2, record=False, mutate=steps.append))
    assert steps[0].mode_counts == {"compiled": 2} and not steps[0].fallbacks
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    torch._dynamo.reset()
