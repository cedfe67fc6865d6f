"""The captured mode of the fast step (rwp_fast.train.graphs), proven on CPU where no GPU is needed.

``EagerPhase`` runs each phase body at every replay, so the CPU drives exactly the code a CUDA graph
records, replay by replay:

* it equals the reference step by step in float64, in every case;
* a step is 1 + F + B + 1 phase calls (F probe forwards, B probe backwards, B = F or F − 1 after an empty
  mask), with no backward after an empty mask, and at most ``OUTSIDE_OPS`` aten ops outside the phases;
* the tensors the phases touch keep their addresses across steps, through ``zero_grad(set_to_none=True)``
  and ``optimizer.load_state_dict``;
* eligibility is decided once at start-up; a capture that raises warns once, leaves the state untouched
  and the step compiled (here: uncaptured).
"""

import copy

import pytest
import torch

from equivalence import CASES, assert_equivalent, make_cfg, run_pair, twin_models
from rwp_fast.models import build_model
from rwp_fast.perturb import FlatWeights, WeightPerturbation
from rwp_fast.train.fast_step import FastTrainStep
from rwp_fast.train.graphs import EagerPhase, PhaseGraphs

# Aten ops a captured step dispatches outside its phases (the phases are graph replays on a GPU):
# the lr fill 1; the batch copies 2; the L∞ random start's draw (rand, ·2, −1) 3 and its copy 1;
# the result's copies of loss, logits, x_adv and ‖v‖/‖w‖ 4; and per probe forward one count read.
OUTSIDE_OPS = 11


def drive_eagerly(step):
    """Put `step` in captured mode with EagerPhase graphs (the run_pair mutate hook)."""
    step.graphs = PhaseGraphs(step, phase=EagerPhase, warmup=0)  # every unit "captured" from the first step
    step.mode = "captured"


@pytest.mark.parametrize("case", list(CASES))
def test_captured_bodies_run_eagerly_equal_the_reference(case):
    cfg = make_cfg("torch", **CASES[case], compile_mode="cuda-graphs")
    records = run_pair(cfg, mutate=drive_eagerly, capture=False)
    assert_equivalent(records)


class _Outside(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops while no phase is replaying."""

    def __init__(self):
        super().__init__()
        self.inside, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountedPhase(EagerPhase):
    counter = None

    def replay(self):
        _CountedPhase.counter.inside += 1
        try:
            return super().replay()
        finally:
            _CountedPhase.counter.inside -= 1


@pytest.mark.parametrize("c_min", [2.33, 0.0, float("inf")], ids=["breaks-late", "empty-at-once", "never-empty"])
def test_phase_calls_per_step_and_ops_outside_them(c_min):
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"], c_min=c_min, compile_mode="cuda-graphs")
    _, model = twin_models()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step = FastTrainStep(model, opt, cfg, "cpu", capture=False)
    step.graphs, step.mode = PhaseGraphs(step, phase=_CountedPhase, warmup=0), "captured"
    phases = step.graphs
    data = torch.Generator().manual_seed(1)
    batches = [(torch.rand(24, 1, 8, 8, generator=data), torch.randint(0, 10, (24,), generator=data))
               for _ in range(4)]
    _CountedPhase.counter = _Outside()
    step(model, opt, *batches[0], cfg, generator=torch.Generator().manual_seed(9))  # allocates the buffers
    for i, (x, y) in enumerate(batches[1:]):
        before = [p.replays for p in (phases.attack, phases.probe_forward, phases.probe_backward, phases.train)]
        _CountedPhase.counter = counter = _Outside()
        with counter:
            r = step(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(i))
        calls = [p.replays - b for p, b in zip((phases.attack, phases.probe_forward, phases.probe_backward,
                                                 phases.train), before)]
        forwards, backwards = len(r.search.mask_fractions), r.search.steps_taken
        assert calls == [1, forwards, backwards, 1]
        broke = r.search.mask_fractions[-1] == 0
        assert backwards == forwards - broke  # no backward after an empty mask
        reads = counter.ops.count("aten._local_scalar_dense.default")
        assert reads == forwards, counter.ops  # one count read per probe, none elsewhere
        assert len(counter.ops) - reads <= OUTSIDE_OPS, counter.ops
        if c_min == 0.0:
            assert forwards == 1 and backwards == 0
        if c_min == float("inf"):
            assert forwards == backwards == cfg.k2


def test_phase_buffers_keep_their_addresses_across_steps():
    """What a captured graph reads and writes must not move, even when the user replaces .grad tensors
    (zero_grad's default) or the optimizer state (load_state_dict, as a resume does)."""
    cfg = make_cfg("torch", **CASES["at-rwp-paper-layer"])
    _, model = twin_models()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step = FastTrainStep(model, opt, cfg, "cpu")

    def addresses():
        s, p = step, step.perturbation
        tensors = [s.flat.w, s.flat.g, *s.flat.other_grads, *s.sgd.buffers, s.sgd.lr, p.a, p.scale, p.w_sq,
                   p.a_sq, p.count, p.v_norm_ratio, *p.snapshot, *([] if s.buffers is None else
                                                                   [t for t in s.buffers.values() if t is not None])]
        return [t.data_ptr() for t in tensors]
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    step(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(0))
    first = addresses()
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new momentum tensors, same values (a resume)
        step(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(i))
        assert addresses() == first
        assert all(opt.state[p]["momentum_buffer"] is b for p, b in zip(step.params, step.sgd.buffers))
        assert all(p.grad is g for p, g in zip(step.flat.other_params, step.flat.other_grads))


class _ForeachCopies(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._foreach_copy_.default:
            self.calls.append({t.dtype for t in args[0]})
        return func(*args, **(kwargs or {}))


def test_bn_snapshot_copies_one_dtype_per_foreach_copy():
    """A mixed fp32/int64 list makes CUDA _foreach_copy_ fall back to one copy per tensor (≈190 launches
    per snapshot on WRN-34-10)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,))
    search = WeightPerturbation(FlatWeights(model), list(model.buffers()), 0.01, 2, (0.0, 3.0))
    assert [d for d, _, _ in search.snapshot_groups] == [torch.float32, torch.int64]
    with _ForeachCopies() as mode:
        search.save_buffers()
        search.restore_buffers()
    assert mode.calls == [{torch.float32}, {torch.int64}] * 2


# -------------------------------------------------------------------------------- eligibility, fallback
def test_cuda_graphs_without_cuda_warns_once_at_start_up():
    cfg = make_cfg("torch", **CASES["at-awp"], compile_mode="cuda-graphs")
    _, model = twin_models()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    with pytest.warns(RuntimeWarning, match="cuda-graphs.*no CUDA graphs") as caught:
        step = FastTrainStep(model, opt, cfg, "cpu")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert step.mode == "eager"
    auto = make_cfg("torch", **CASES["at-awp"], compile_mode="auto")
    _, model = twin_models()
    assert FastTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), auto, "cpu").mode == "eager"


class _FailingProbeCapture(EagerPhase):
    """Captures the attack, then raises when the probe unit is captured (the 2nd capture)."""

    def __init__(self, body, pool=None):
        if getattr(body, "__name__", "") == "probe_forward":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        super().__init__(body, pool)


def test_a_capture_that_raises_warns_once_and_changes_nothing(monkeypatch):
    """The attack unit is captured, the probe unit's capture raises: capturing launches nothing, so the run
    then equals one that never tried, and it stays uncaptured."""
    cfg = make_cfg("torch", **CASES["at-rwp-accumulate-layer"])
    data = torch.Generator().manual_seed(1)
    batches = [(torch.rand(24, 1, 8, 8, generator=data), torch.randint(0, 10, (24,), generator=data))
               for _ in range(4)]

    def run(try_capture):
        _, model = twin_models()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        step = FastTrainStep(model, opt, cfg, "cpu")
        if try_capture:  # as after the warm-up on a GPU
            step.mode = "captured"
            step.graphs = PhaseGraphs(step, phase=_FailingProbeCapture, warmup=0)
        gen = torch.Generator().manual_seed(5)
        for x, y in batches:
            step(model, opt, x, y, cfg, generator=gen)
        return step, model

    with pytest.warns(RuntimeWarning, match="capture failed") as caught:
        failed, failed_model = run(True)
    # the step goes on as its phases really run: eager here (compile is off on CPU), compiled where compiled
    assert len(caught) == 1 and failed.mode == "eager" and failed.graphs is None
    assert "RuntimeError: CUDA error: operation not permitted when stream is capturing\nmore" in str(caught[0].message)
    _, plain_model = run(False)
    for (name, a), b in zip(failed_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


class _CompileFreeCapture(EagerPhase):
    """Runs its body once at construction, as a capture does, where Dynamo must not compile anything: a
    compile inside a real capture is refused ('cannot JIT compile during CUDA graph capture')."""

    def __init__(self, body, pool=None):
        super().__init__(body, pool)
        with torch.compiler.set_stance("fail_on_recompile"):
            self.outputs = body()


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["masks-empty", "warm-up-epochs", "partial-masks"])
def test_no_unit_is_captured_before_its_compilations(regime, monkeypatch):
    """Compiled phases (aot_eager) in captured mode: a unit is captured only after it ran warm, whatever the
    masks do (empty masks never run the probe backward; warm-up epochs run no probe at all)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    c_min = {"masks-empty": 0.0}.get(regime, 2.33)
    cfg = make_cfg("torch", **dict(CASES["at-rwp-accumulate-layer"], c_min=c_min), compile=True)
    _, model = twin_models(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    step = FastTrainStep(model, opt, cfg, "cpu")
    step.mode, step.graphs = "captured", PhaseGraphs(step, phase=_CompileFreeCapture)
    data = torch.Generator().manual_seed(1)
    for i in range(6):
        x, y = torch.rand(24, 1, 8, 8, generator=data), torch.randint(0, 10, (24,), generator=data)
        step(model, opt, x, y, cfg, perturb_active=regime != "warm-up-epochs" or i >= 3,
             generator=torch.Generator().manual_seed(i))
    assert step.mode == "captured" and step.graphs.attack is not None and step.graphs.train is not None
    assert (step.graphs.probe_forward is None) == (regime == "masks-empty")
    torch._dynamo.reset()


# -------------------------------------------------------------------------------------------- on a GPU
MODES = [("cuda-graphs", False), ("cuda-graphs", True)]


def gpu_mode_configs(comp):
    """{compile_mode: RunConfig} of the GPU comparison below, built here so that the CPU test after it
    catches an argument error that only the GPU test would otherwise hit."""
    return {m: make_cfg("auto", **CASES["at-rwp-accumulate-layer"], device="cuda", compile_mode=m, compile=comp)
            for m in ("default", "cuda-graphs")}


@pytest.mark.parametrize("mode,comp", MODES)
def test_gpu_mode_configs_build_on_cpu(mode, comp):
    cfgs = gpu_mode_configs(comp)
    assert list(cfgs) == ["default", mode]
    assert all(c.device == "cuda" and c.backend == "auto" and c.compile == comp for c in cfgs.values())


@pytest.mark.gpu
@pytest.mark.parametrize("active_from", [0, 3], ids=["search-from-step-0", "warm-up-epochs"])
@pytest.mark.parametrize("mode,comp", MODES)
def test_captured_step_equals_the_uncaptured_step_on_gpu(mode, comp, active_from):
    """fp32, TF32 off (conftest): the captured step against the uncaptured one with the same compile flag,
    8 steps (2 warm-up, then captured unit by unit), AT-RWP with a partial mask; with warm-up epochs the
    search starts at step 3, so the probe unit is captured later than the others."""
    device = torch.device("cuda")
    results = []
    for m, cfg in gpu_mode_configs(comp).items():
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, 1, (0.3,), (0.37,)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        step = FastTrainStep(model, opt, cfg, device)
        data = torch.Generator().manual_seed(1)
        out = []
        for i in range(8):
            x = torch.rand(24, 1, 8, 8, generator=data).to(device)
            y = torch.randint(0, 10, (24,), generator=data).to(device)
            r = step(model, opt, x, y, cfg, perturb_active=i >= active_from,
                     generator=torch.Generator(device).manual_seed(100 + i))
            out.append((r.x_adv, float(r.loss), r.search.steps_taken))
        assert step.mode == ("captured" if m == "cuda-graphs" else "compiled" if comp else "eager"), m
        assert m == "default" or None not in (step.graphs.attack, step.graphs.probe_forward, step.graphs.train), m
        results.append((out, [t.clone() for t in model.state_dict().values()]))
    (eager, sd_e), (graphed, sd_g) = results
    for (xa, la, sa), (xb, lb, sb) in zip(eager, graphed):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)
        # Same kernels, but cuDNN's backward is not deterministic: an input gradient within an ulp of 0 may
        # flip one sign, which moves that pixel by up to 2α. Allow such flips on at most 1% of the pixels.
        assert ((xa - xb).abs() > 1e-6).float().mean() <= 0.01
    for a, b in zip(sd_e, sd_g):
        if a.is_floating_point():
            assert (a - b).norm() <= 1e-4 * a.norm() + 1e-6
