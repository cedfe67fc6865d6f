"""Microbenchmark of the fused op ``weight_perturb`` (SPEC.md §2): one RWP iteration's weight update.

    python -m rwp_fast.bench.bench_weight_perturb --device cuda --json out/bench_weight_perturb.json

One timed call is the weight side of one RWP step with the 'accumulate' rule and layer scope, over every
perturbed conv/linear weight of the model:

    w ← w − v_old;   a ← a + g;   v = γ‖w0_l‖·a_l/(‖a_l‖ + 1e-20);   w ← w + v

Implementations, timed in the same process:
  * ``eager``: the reference search's own per-layer code over separate tensors
    (``add_perturbation`` and ``_rescale`` of ``rwp_fast.reference.perturbation_search``), the released
    code's shape: a Python loop, several kernels per layer;
  * ``eager_flat``: the oracle functions of ``rwp_fast.reference.weight_perturb`` on one flat buffer;
  * ``compile``: torch.compile of ``eager``;
  * ``foreach``: torch ``_foreach_*`` over the per-layer tensors (the scales go to the host once per
    call, since foreach scalar lists are Python floats);
  * ``triton``/``cuda``: the fused backends of ``rwp_fast.ops`` on one flat buffer: axpy −,
    accumulate + norms, perturb_scale, axpy + (5 launches plus perturb_scale's few tiny torch ops,
    whatever the number of layers).
Each is checked against ``eager`` (one iteration from the same state) before it is timed.

GB/s counts the fused op's compulsory traffic, 9·N·4 bytes for N fp32 weights: w read and written
twice (the two axpys), a read three times and written once, g read once.
"""

import functools

import torch

from rwp_fast.bench import common  # first: without CUDA it turns on TRITON_INTERPRET before a kernel import

from rwp_fast import ops
from rwp_fast.ops.weight_perturb import SegmentTable
from rwp_fast.reference.perturbation_search import _rescale, add_perturbation
from rwp_fast.reference.weight_perturb import (
    accumulate_sq_norm_ref,
    perturb_axpy_ref,
    perturb_scale_ref,
    segment_sq_norm_ref,
)

try:
    import pytest
except ImportError:  # the GPU machine may run the CLI without pytest
    pytest = None

OP = "weight_perturb"
GAMMA = 0.01  # SPEC.md §2, AT-RWP

# The perturbed tensors (conv and linear *weight, dim > 1) of the paper's models for 10 classes, in
# named_parameters order. Hardcoded so that the benchmark does not depend on rwp_fast.models; the CPU
# smoke test checks them against the models when those import.
# PreAct ResNet-18: 21 tensors, 11.2M weights.
PREACT_RESNET18 = (
    [(64, 3, 3, 3)] + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1)] + [(128, 128, 3, 3)] * 2
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1)] + [(256, 256, 3, 3)] * 2
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1)] + [(512, 512, 3, 3)] * 2
    + [(10, 512)]
)
# WideResNet-34-10: 5 blocks per group, widths 160/320/640; 35 tensors, 46.1M weights.
WRN_34_10 = (
    [(16, 3, 3, 3)]
    + [(160, 16, 3, 3), (160, 160, 3, 3), (160, 16, 1, 1)] + [(160, 160, 3, 3)] * 8
    + [(320, 160, 3, 3), (320, 320, 3, 3), (320, 160, 1, 1)] + [(320, 320, 3, 3)] * 8
    + [(640, 320, 3, 3), (640, 640, 3, 3), (640, 320, 1, 1)] + [(640, 640, 3, 3)] * 8
    + [(10, 640)]
)
CASES = {"preact_resnet18": PREACT_RESNET18, "wrn_34_10": WRN_34_10}
SMOKE_CASES = {"tiny_cnn": [(8, 3, 3, 3), (16, 8, 3, 3), (16, 8, 1, 1), (1, 1), (10, 16)]}


def _numel(shape):
    return torch.Size(shape).numel()


def make_state(shapes, device):
    """Unperturbed weights w0, direction a (as after some steps), next gradient g, and the current
    scale s_old with w = w0 + s_old·a: flat fp32 buffers plus the SegmentTable."""
    numels = [_numel(s) for s in shapes]
    table = SegmentTable.from_numels(numels).to(device)
    w0 = torch.randn(table.numel, device=device) * 0.05
    a = torch.randn(table.numel, device=device) * 1e-3
    g = torch.randn(table.numel, device=device) * 1e-3
    w_sq = segment_sq_norm_ref(w0, table.offset_list)
    s_old = perturb_scale_ref(w_sq, segment_sq_norm_ref(a, table.offset_list), GAMMA)
    w = perturb_axpy_ref(w0, a, s_old, table.offset_list, +1)
    return {"shapes": shapes, "numels": numels, "table": table, "w": w, "a": a, "g": g, "w_sq": w_sq,
            "s_old": s_old}


def _split(flat, state):
    return [t.clone().view(s) for t, s in zip(flat.split(state["numels"]), state["shapes"])]


def eager_impl(state):
    """The reference search's per-layer update on separate tensors (what the released code does)."""
    params = _split(state["w"], state)
    running = _split(state["a"], state)
    grads = _split(state["g"], state)
    seg = torch.repeat_interleave(state["s_old"], torch.tensor(state["numels"], device=state["a"].device))
    v = _split(seg * state["a"], state)  # v_l = s_old,l·a_l, the same fp32 product as the fused op's
    w_norms = list(torch.sqrt(state["w_sq"]).unbind())
    box = {"running": running, "v": v}

    def step():
        add_perturbation(params, box["v"], -1)
        box["running"] = [r + g for r, g in zip(box["running"], grads)]
        box["v"] = _rescale(box["running"], w_norms, GAMMA, "layer")
        add_perturbation(params, box["v"], +1)
        return params
    return step, lambda: torch.cat([p.reshape(-1) for p in params])


def compiled_eager_impl(state):
    step, result = eager_impl(state)
    compiled, reason = common.try_compile(step)
    if compiled is None:
        raise RuntimeError(reason)
    return compiled, result


def eager_flat_impl(state):
    """The oracle functions of rwp_fast.reference.weight_perturb on the flat buffer."""
    w, a, g, offsets = state["w"].clone(), state["a"].clone(), state["g"], state["table"].offset_list
    box = {"s": state["s_old"]}

    def step():
        w.copy_(perturb_axpy_ref(w, a, box["s"], offsets, -1))
        a_new, a_sq = accumulate_sq_norm_ref(a, g, offsets)
        a.copy_(a_new)
        box["s"] = perturb_scale_ref(state["w_sq"], a_sq, GAMMA)
        w.copy_(perturb_axpy_ref(w, a, box["s"], offsets, +1))
    return step, lambda: w


def foreach_impl(state):
    """torch._foreach_* over separate per-layer tensors; scales as Python floats (one host sync)."""
    params, running, grads = (_split(state[k], state) for k in ("w", "a", "g"))
    w_norm = torch.sqrt(state["w_sq"])
    box = {"s": state["s_old"].tolist()}

    def step():
        torch._foreach_sub_(params, torch._foreach_mul(running, box["s"]))
        torch._foreach_add_(running, grads)
        a_norm = torch.stack(torch._foreach_norm(running))
        box["s"] = (GAMMA * w_norm / (a_norm + 1e-20)).tolist()
        torch._foreach_add_(params, torch._foreach_mul(running, box["s"]))
    return step, lambda: torch.cat([p.reshape(-1) for p in params])


def fused_impl(state, backend):
    """rwp_fast.ops on the flat buffer: a fixed number of launches for any number of layers."""
    w, a, g, table = state["w"].clone(), state["a"].clone(), state["g"], state["table"]
    box = {"s": state["s_old"]}

    def step():
        ops.perturb_axpy_(w, a, box["s"], table, -1, backend=backend)
        a_sq = ops.accumulate_sq_norm_(a, g, table, None, backend=backend)
        box["s"] = ops.perturb_scale(state["w_sq"], a_sq, GAMMA, "layer")
        ops.perturb_axpy_(w, a, box["s"], table, +1, backend=backend)
    return step, lambda: w


class _Impl:
    """One implementation: check() builds its private copy of the state, runs one iteration and compares
    with the eager result; calling it then runs further iterations on that state (what is timed)."""

    def __init__(self, build, state, expected):
        self.build, self.state, self.expected, self.step = build, state, expected, None

    def check(self):
        self.step, result = self.build(self.state)
        self.step()
        # v is formed as γ‖w‖·a/‖a‖ (eager) or (γ‖w‖/‖a‖)·a (fused): a few fp32 roundings of |v| ~ γ|w|,
        # plus one rounding of w ± v; atol 3e-7 is ~2 ulps of |w| ≤ 0.3.
        torch.testing.assert_close(result(), self.expected, rtol=1e-5, atol=3e-7)

    def __call__(self):
        return self.step()


def implementations(state, device, compile_=True, fused=None):
    """[(impl, fn, check, skip reason)], eager first. Each implementation gets its own copy of the state."""
    step, result = eager_impl(state)
    step()
    expected = result().clone()
    builders = [("eager", eager_impl), ("eager_flat", eager_flat_impl)]
    if compile_:
        builders.append(("compile", compiled_eager_impl))
    builders.append(("foreach", foreach_impl))
    for name, reason in fused if fused is not None else common.fused_backends(device, OP):
        builders.append((name, reason or functools.partial(fused_impl, backend=name)))
    impls = []
    for name, build in builders:
        if isinstance(build, str):  # the reason the backend is unavailable
            impls.append((name, None, None, build))
        else:
            impl = _Impl(build, state, expected)
            impls.append((name, impl, impl.check, None))
    return impls


def run(device, json_path=None, quick=False, compile_=True):
    meta = common.run_metadata(device)
    rows = []
    for model, shapes in (SMOKE_CASES if quick else CASES).items():
        state = make_state(shapes, device)
        n = state["table"].numel
        case = f"{model} L={len(shapes)} N={n / 1e6:.1f}M fp32"
        rows += common.run_case(meta, OP, case, implementations(state, device, compile_), device, 9 * n * 4)
        del state
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    common.print_table(rows)
    common.write_json(rows, json_path)
    return rows


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run(args.device, args.json, args.quick, not args.no_compile)


if pytest is not None:
    # Not "eager": the expected values come from it, so it would compare with itself.
    @pytest.mark.parametrize("impl", ["eager_flat", "foreach", "triton"])
    def test_weight_perturb_bench(benchmark, impl):
        """CPU smoke: every implementation runs and matches the per-layer reference (tiny sizes)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = make_state(SMOKE_CASES["tiny_cnn"], device)
        impls = {name: (fn, check, reason) for name, fn, check, reason in implementations(
            state, device, compile_=False, fused=[("triton", common.backend_error("triton", device, OP))])}
        fn, check, reason = impls[impl]
        if fn is None:
            pytest.skip(reason)
        check()
        benchmark(fn)

    def test_model_shapes_match_rwp_fast_models():
        """The hardcoded shape lists are the perturbed tensors of rwp_fast.models' networks."""
        models = pytest.importorskip("rwp_fast.models")
        from rwp_fast.core import perturbed_parameters
        with torch.device("meta"):
            nets = {"preact_resnet18": models.preact_resnet18(num_classes=10),
                    "wrn_34_10": models.WideResNet(depth=34, widen_factor=10, num_classes=10)}
        for name, net in nets.items():
            shapes = [tuple(p.shape) for _, p in perturbed_parameters(net)]
            assert sorted(shapes) == sorted(CASES[name]), name


if __name__ == "__main__":
    main()
