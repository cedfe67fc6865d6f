"""The end-to-end throughput suite (``bench/bench_e2e.py``) and its released-code baseline, on the CPU.

(a) ``python -m bench --smoke`` runs end to end and gives a row for every variant and method, without
    touching bench/results; (b) the released baseline computes the reference's v (rtol 1e-3, the
    released code's own rounding, SPEC.md §2) and leaves the model's BN buffers alone; its full step and
    its attack match the reference; (c) the FLOP counter sees the attack's weight-gradient convolutions
    exactly when they are computed: eager ``autograd.grad`` prunes them, ``backward()`` does not, and a
    compiled backward computes them unless the weights are frozen; (d) each row says the mode its step ran
    in: a captured row counts its phase replays (1 + F + B + 1 per step), a failed capture is a fallback row.
"""

import copy
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# One name for the bench engine, rwp_fast.bench (bench/__init__.py); never `bench.*`.
from rwp_fast.bench import bench_e2e, e2e_configs, e2e_flops, e2e_report
from rwp_fast.bench.released_baseline import ReleasedAWP, ReleasedRWP, ReleasedTrainStep, attack_pgd_released
from rwp_fast.config import RunConfig
from rwp_fast.models import build_model
from rwp_fast.reference import perturbed_parameters, pgd_attack_ref, train_step_ref, weight_perturbation_search_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GAMMA = 0.01


def small_model(seed=0):
    """small_cnn on 3 channels: three convs with BN (running stats to protect) and a linear layer."""
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, 3, (0.5,) * 3, (0.25,) * 3)


def batch(n=32, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def rel_err(a, b):
    a = torch.cat([t.detach().reshape(-1).double() for t in a])
    b = torch.cat([t.detach().reshape(-1).double() for t in b])
    return ((a - b).norm() / b.norm()).item()


def mid_gap_c_min(model, x, y):
    """A c_min in the widest gap between the middle per-example losses, so that the mask is mixed and no
    loss sits near the threshold (a 1e-4 move of a loss cannot flip it)."""
    with torch.no_grad():
        losses = torch.sort(F.cross_entropy(copy.deepcopy(model).train()(x), y, reduction="none")).values
    n = len(losses)
    lo, hi = n // 4, 3 * n // 4
    gaps = losses[lo + 1:hi + 1] - losses[lo:hi]
    i = lo + int(gaps.argmax())
    assert losses[i + 1] - losses[i] > 1e-3
    return float((losses[i] + losses[i + 1]) / 2)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- (a)
@pytest.mark.slow
def test_smoke_suite_runs_every_variant(tmp_path):
    out = tmp_path / "e2e.json"
    results = os.path.join(ROOT, "bench", "results", "e2e.jsonl")
    before = os.stat(results).st_mtime_ns if os.path.exists(results) else None
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    e2e = [r for r in rows if r["kind"] == "e2e"]
    assert {(r["variant"], r["method_key"]) for r in e2e} == \
        {(v, m) for v in e2e_configs.VARIANTS for m in e2e_configs.METHODS}
    skipped = {v for v in e2e_configs.VARIANTS if e2e_configs.skip_reason(v, "cpu", smoke=True)}
    assert "compiled" in skipped  # Inductor's C++ compile: minutes; a run without --smoke measures it
    for r in e2e:
        assert bench_e2e.SMOKE_LABEL in r["note"]
        if r["variant"] in e2e_configs.NOT_IMPLEMENTED:
            assert r["images_per_s"] is None and "not implemented" in r["note"]
            continue
        if r["variant"] in skipped:  # CUDA-only variants, and compiled in a CPU smoke run: a reason, no figure
            assert r["images_per_s"] is None and e2e_configs.skip_reason(r["variant"], "cpu", True) in r["note"], r
            continue
        assert r["images_per_s"] > 0, r
        # CPU: nothing captures, nothing falls back; every measured variant runs eager here
        assert r["mode"] == r["settings"]["mode"] == "eager" and "fallback" not in r, r
        assert "replays_per_step" not in r and r["ops_per_step"] > 0, r  # the launch proxy of eager rows
        assert "probes_launched" not in r
        assert r["probes"] == r["expected_probes"], r
        assert r["flops_per_step_useful"] > 0 and r["flops_per_step_own"] >= r["flops_per_step_useful"]
        assert r["tflops"] > 0 and r["device"] and r["git_commit"] and r["config"]["batch_size"] == r["batch"]
    targets = [r for r in rows if r["kind"] == "target"]
    assert len(targets) == 2 and all(r["status"] in ("n/a (smoke)", "not measured") for r in targets)
    (check,) = [r for r in rows if r["kind"] == "check"]
    assert "compiled skips only when frozen: True" in check["answer"], check["answer"]
    assert "| variant | model | batch | method | regime | images/s | ×released | TFLOP/s | MFU |" in proc.stdout
    after = os.stat(results).st_mtime_ns if os.path.exists(results) else None
    assert after == before, "a smoke run must not write bench/results"


def test_expected_probe_counts_and_regimes():
    """c_min = inf passes config validation (all K2 probes), c_min = 0 gives the empty mask [0, 0)."""
    all_probes = e2e_configs.make_cfg("small_cnn", 8, "at-rwp-all", "fast", "cpu")
    assert all_probes.c_min == math.inf and all_probes.lsc_range == (0.0, math.inf)
    assert e2e_configs.expected_probes(all_probes, "fast") == 10
    brk = e2e_configs.make_cfg("small_cnn", 8, "at-rwp-break", "fast", "cpu")
    assert brk.lsc_range == (0.0, 0.0)
    assert e2e_configs.expected_probes(brk, "fast") == 1
    assert e2e_configs.expected_probes(e2e_configs.make_cfg("small_cnn", 8, "at-rwp-break", "released", "cpu"),
                                     "released") == 10  # the released loop never breaks


# ------------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("perturb,scope", [("rwp", "global"), ("rwp", "layer"), ("awp", "layer")])
def test_released_v_matches_reference_and_keeps_bn(perturb, scope):
    model = small_model()
    x_adv, y = batch()
    k2, c_min = (4, mid_gap_c_min(model, x_adv, y)) if perturb == "rwp" else (1, math.inf)
    ref_model = copy.deepcopy(model)
    v_ref, info = weight_perturbation_search_ref(
        ref_model, lambda m: F.cross_entropy(m(x_adv).float(), y, reduction="none"), GAMMA, k2,
        (0.0, c_min), "accumulate", scope)
    if perturb == "rwp":
        assert info.steps_taken == k2 and 0 < info.mask_fractions[0] < 1  # a mixed mask, every probe

    before = snapshot(model)
    adversary = ReleasedRWP(model, GAMMA, k2, c_min, scope) if perturb == "rwp" else ReleasedAWP(model, GAMMA, scope)
    diff_scale = adversary.calc(x_adv, y)
    v_released = [GAMMA * diff_scale[n] for n, _ in perturbed_parameters(model)]
    assert list(diff_scale) == [n for n, _ in perturbed_parameters(model)]
    err = rel_err(v_released, v_ref)
    assert err < 1e-3, err  # the fp32 difference of two proxy copies: ~1e-4 here
    # the probes ran on the proxies: the model's weights and BN running statistics are bit-identical
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    # ...and the proxies did run in train mode (their running statistics moved)
    proxy = adversary.proxy_2 if perturb == "rwp" else adversary.proxy
    assert not torch.equal(proxy.state_dict()["net.bn1.running_mean"], before["net.bn1.running_mean"])


RELEASED_RTOL = 1e-9  # float64; the error model is in the docstring below


@pytest.mark.parametrize("perturb", ["rwp", "awp", "none"])
def test_released_step_matches_reference_step(perturb):
    """With the same x_adv, one released step (perturb, SGD at w + v, restore) lands where the reference
    step lands, in float64. The released code forms each probe's step as the difference of two proxy
    copies, (w + 0.01·g) − w: that loses log10(‖w‖/(0.01·‖g‖)) digits, ~5e3× the rounding u (SPEC.md §2:
    3e-4 in fp32, u = 6e-8), so in fp64 (u = 1.1e-16) v differs by ~6e-13. 1e-9 keeps a 1,000× margin on
    any machine; in fp32 the same difference depended on the CPU's rounding (4.3e-3 against 1e-3 on one)."""
    model = small_model().double()
    x, y = batch()
    x = x.double()
    kw = dict(dataset="synthetic", model="small_cnn", perturb=perturb, gamma=GAMMA, k2=4, lr=0.1,
              momentum=0.9, weight_decay=5e-4, norm_scope="global" if perturb == "rwp" else "layer", device="cpu")
    if perturb == "rwp":
        kw["c_min"] = mid_gap_c_min(model, x, y)
    cfg = RunConfig(**kw).validate()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    step = ReleasedTrainStep(model, cfg)
    step.keep_v = True
    for i in range(2):
        res = step(model, opt, x, y, cfg, x_adv=x)
        ref = train_step_ref(ref_model, ref_opt, x, y, cfg, x_adv=x)
        assert res.loss == pytest.approx(ref.loss, rel=RELEASED_RTOL)
        if perturb != "none":
            assert rel_err(res.v, ref.v) < RELEASED_RTOL
    ref_state = ref_model.state_dict()
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            assert rel_err([t], [ref_state[k]]) < RELEASED_RTOL, k


def test_released_attack_matches_reference_and_computes_weight_grads():
    model = small_model().train()
    x, y = batch()
    eps, alpha = 8 / 255, 2 / 255
    x_rel = attack_pgd_released(model, x, y, eps, alpha, 3, torch.Generator().manual_seed(5))
    # the released attack calls backward(): the weight gradients were computed (and left in .grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in perturbed_parameters(model))
    model.zero_grad(set_to_none=True)
    x_ref = pgd_attack_ref(model, x, y, eps, alpha, 3, generator=torch.Generator().manual_seed(5))
    assert (x_rel - x).abs().max() <= eps + 1e-6 and x_rel.min() >= 0 and x_rel.max() <= 1
    # same start and same sign steps; delta-space vs x-space rounding may flip the odd sign(·)
    assert ((x_rel - x_ref).abs() > 1e-5).float().mean() < 0.01


# ------------------------------------------------------------------------------------------------- (c)
def test_flop_counter_sees_attack_weight_grads():
    model = small_model().train()
    x, y = batch(8, 16)
    flops = e2e_flops.attack_step_flops(model, x, y)
    (frozen, f_ops), (unfrozen, _), (backward, b_ops) = flops["frozen"], flops["unfrozen"], flops["backward"]
    conv = "aten.convolution"
    conv_bwd = "aten.convolution_backward"
    # frozen: each convolution_backward only computes the input gradient, as many FLOPs as the forward conv
    assert f_ops[conv_bwd] == f_ops[conv]
    # backward() also computes every weight gradient: twice the forward conv FLOPs
    assert b_ops[conv_bwd] == 2 * b_ops[conv]
    assert frozen / backward == pytest.approx(2 / 3, abs=0.01)
    # eager autograd.grad w.r.t. the input prunes the weight-gradient convs even with trainable weights
    assert unfrozen == frozen


def test_compiled_backward_computes_weight_grads_unless_frozen():
    model = small_model().train()
    x, y = batch(8, 16)
    n_frozen, w_frozen = e2e_flops.compiled_conv_weight_grads(model, x, y, freeze=True)
    n_unfrozen, w_unfrozen = e2e_flops.compiled_conv_weight_grads(model, x, y, freeze=False)
    assert n_frozen == n_unfrozen == 3  # small_cnn's three convs
    assert w_frozen == 0 and w_unfrozen == 3
    assert all(p.requires_grad for p in model.parameters())  # frozen() restored them


def test_step_flops_follow_the_cost_model():
    """Per image, fast AT = K1·(F + F) + 3F and each all-probes RWP probe adds 3F (SPEC.md §6); the
    released step adds K1 weight-gradient passes and one forward; its break regime still runs K2 probes."""
    count = e2e_flops.count_step_flops
    fast_at = count("fast", "small_cnn", "at", "cpu", smoke=True)        # K1 = 2, K2 = 3
    fast_all = count("fast", "small_cnn", "at-rwp-all", "cpu", smoke=True)
    fast_brk = count("fast", "small_cnn", "at-rwp-break", "cpu", smoke=True)
    rel_at = count("released", "small_cnn", "at", "cpu", smoke=True)
    rel_brk = count("released", "small_cnn", "at-rwp-break", "cpu", smoke=True)
    forward = (fast_brk - fast_at)  # the break regime's single probe forward
    assert fast_at == pytest.approx(7 * forward, rel=0.02)
    assert fast_all == pytest.approx(fast_at + 3 * 3 * forward, rel=0.02)
    assert rel_at == pytest.approx(fast_at + 2 * forward + forward, rel=0.02)
    assert rel_brk == pytest.approx(rel_at + 3 * 3 * forward, rel=0.02)


def test_summary_reports_targets_met_and_missed():
    """The target logic on fabricated CUDA rows: 9× released meets 8×, an AT-RWP/AT ratio of 2.5 misses 2.3."""
    meta = {"device_type": "cuda", "device": "NVIDIA H100"}

    def row(variant, method_key, ips, model="preact_resnet18", batch=128):
        return {**meta, "kind": "e2e", "variant": variant, "model": model, "batch": batch,
                "method_key": method_key, "images_per_s": ips}
    rows = [row("released", "at-rwp-all", 100.0), row("fast", "at-rwp-all", 900.0), row("fast", "at", 2250.0),
            row("fast", "at-rwp-break", 1500.0)]
    out = e2e_report.summary_rows(rows, {}, meta, smoke=False)
    assert rows[1]["speedup_vs_released"] == pytest.approx(9.0)
    (speed,) = [r for r in out if r["kind"] == "target" and "8x" in r["name"]]
    assert speed["status"] == "met" and speed["value"] == pytest.approx(9.0)
    (ratio,) = [r for r in out if r["kind"] == "target" and "2.3" in r["name"]]
    assert ratio["status"] == "missed" and ratio["value"] == pytest.approx(2.5)
    rows[0]["images_per_s"] = 200.0  # 4.5×: missed
    out = e2e_report.summary_rows(rows, {}, meta, smoke=False)
    assert [r["status"] for r in out if r["kind"] == "target" and "8x" in r["name"]] == ["missed"]
    cpu = e2e_report.summary_rows(rows, {}, {"device_type": "cpu"}, smoke=False)
    assert all(r["status"].startswith("n/a") for r in cpu if r["kind"] == "target")


def test_device_plan_puts_the_target_rows_first():
    args = bench_e2e.parse_args(["--device", "cpu", "--plan", "device"])
    plan = e2e_configs.build_plan(args)
    assert plan[:3] == [("preact_resnet18", 128, "released"), ("preact_resnet18", 128, "fast"),
                        ("preact_resnet18", 128, "compiled")]  # captured vs compiled, right after the target
    assert {v for _, _, v in plan} == set(e2e_configs.VARIANTS)  # every variant appears
    assert list(e2e_configs.METHODS)[:2] == ["at-rwp-all", "at"]
    args = bench_e2e.parse_args(["--device", "cpu", "--models", "wrn-34-10", "--batch-sizes", "128",
                                 "--variants", "fast,released"])
    assert e2e_configs.build_plan(args) == [("wrn-34-10", 128, "released"), ("wrn-34-10", 128, "fast")]


def test_variant_modes_and_skips_on_each_device():
    """fast is the trainer's default (captured on CUDA), compiled its uncaptured baseline; on CPU nothing
    captures, and only a --smoke run skips compiled (Inductor's C++ compile), with the reason."""
    want = {"cuda": {"released": "eager", "reference": "eager", "fast": "captured", "compiled": "compiled",
                     "no-amp": "captured", "no-channels-last": "captured", "no-compile": "captured",
                     "no-fused": "captured", "no-input-only": "captured"},
            "cpu": {"released": "eager", "reference": "eager", "fast": "eager", "compiled": "compiled",
                    "no-amp": "eager", "no-channels-last": "eager", "no-compile": "eager", "no-fused": "eager",
                    "no-input-only": "eager"}}
    assert set(want["cuda"]) == set(e2e_configs.VARIANTS)
    assert not {"reduce-overhead", "cuda-graphs"} & set(e2e_configs.VARIANTS)
    for device, modes in want.items():
        for variant, mode in modes.items():
            cfg = e2e_configs.make_cfg("small_cnn", 8, "at-rwp-all", variant, device)
            assert e2e_configs.planned_mode(variant, cfg, device) == mode, (device, variant)
            assert e2e_configs.resolved_settings(variant, cfg, device)["mode"] == mode
    assert e2e_configs.make_cfg("small_cnn", 8, "at", "fast", "cuda").compile_mode == "auto"  # the default
    assert e2e_configs.make_cfg("small_cnn", 8, "at", "compiled", "cpu").compile is True
    for variant in e2e_configs.VARIANTS:
        assert e2e_configs.skip_reason(variant, "cuda", smoke=True) is None
        assert e2e_configs.skip_reason(variant, "cpu", smoke=False) is None  # a CPU run without --smoke runs it
    reason = e2e_configs.skip_reason("compiled", "cpu", smoke=True)
    assert reason.startswith("skipped: ") and "--smoke" in reason
    assert set(e2e_configs.FAST_FAMILY) == set(e2e_configs.VARIANTS) - {"released", "reference"}


def _suite(methods):
    args = bench_e2e.parse_args(["--device", "cpu", "--smoke", "--methods", ",".join(methods), "--skip", "check",
                                 "--no-results"])
    suite = bench_e2e.Suite(args, {"device_type": "cpu"}, "cpu")
    suite.add_flops = lambda *a: None  # FLOPs are test_smoke_suite's; these tests look at the modes
    suite.log = lambda msg: None
    return suite


def test_captured_rows_count_phase_replays(monkeypatch):
    """A captured row (here: the very phases driven eagerly through graphs.EagerPhase, as the CPU tests of
    the captured mode do) gets replays_per_step = 1 + F + B + 1, counted over the timed steps by wrapping
    each phase's replay; the wrappers are gone afterwards, and no launch proxy is counted for it."""
    from rwp_fast.train.graphs import EagerPhase, PhaseGraphs
    built = []

    def make_step(variant, model, cfg, device):
        step, optimizer = e2e_configs.make_step(variant, model, cfg, device)
        step.graphs, step.mode = PhaseGraphs(step, phase=EagerPhase, warmup=0), "captured"
        built.append(step)
        return step, optimizer
    monkeypatch.setattr(bench_e2e, "make_step", make_step)
    methods = list(e2e_configs.METHODS)
    suite = _suite(methods)
    suite.run_unit("small_cnn", 8, "fast", e2e_configs.make_batches(8, "cpu"))
    rows = {r["method_key"]: r for r in suite.rows}
    # smoke: K2 = 3; all: 3 forwards and 3 backwards; AT: no probe phases; break: one forward, no backward
    expected = {"at-rwp-all": 8, "at": 2, "at-rwp-break": 3, "at-awp": 4}
    assert set(rows) == set(expected)
    for key, n in expected.items():
        r = rows[key]
        assert r["images_per_s"] > 0 and r["mode"] == "captured" and "fallback" not in r, r
        assert r["replays_per_step"] == r["expected_replays_per_step"] == n, r
        assert "replays/step" not in r["note"] and "ops_per_step" not in r, r
        assert r["warmup"] >= bench_e2e.WARMUP_STEPS + 1
        # compile time as a figure: to the end of the first step, and of the first captured one (after the
        # uncaptured warm-up); every timed step ran captured
        assert 0 < r["first_step_s"] <= r["first_captured_step_s"], r
        assert r["timed_mode_counts"] == {"captured": r["steps"] * r["repeats"]}, r
        assert r["mode_counts"]["captured"] > r["steps"] * r["repeats"] and r["fallbacks"] == [], r
    assert rows["at"]["replays_by_phase"] == {"attack": 1, "train": 1}
    assert rows["at-rwp-all"]["replays_by_phase"] == {"attack": 1, "probe_forward": 3, "probe_backward": 3,
                                                       "train": 1}
    for step in built:  # the counting wrappers were removed
        for name in ("attack", "probe_forward", "probe_backward", "train"):
            phase = getattr(step.graphs, name)
            assert phase is None or "replay" not in vars(phase)


def test_a_capture_that_fails_is_a_fallback_row(monkeypatch):
    """A step built to capture whose capture raises runs its phases as they are (here eager: a CPU smoke
    row compiles nothing): the row says fallback, to which mode, why, and has no replay count."""
    from rwp_fast.train import graphs

    def make_step(variant, model, cfg, device):
        step, optimizer = e2e_configs.make_step(variant, model, cfg, device)
        step.mode = "captured"
        step.phase_runs.update(attack=graphs.WARMUP_STEPS, train=graphs.WARMUP_STEPS)  # as after the warm-up
        return step, optimizer

    def failing(step, phase=None):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bench_e2e, "make_step", make_step)
    monkeypatch.setattr(graphs, "PhaseGraphs", failing)
    suite = _suite(["at-rwp-all"])
    suite.run_unit("small_cnn", 8, "fast", e2e_configs.make_batches(8, "cpu"))
    (r,) = suite.rows
    assert r["images_per_s"] > 0 and r["mode"] == "eager" and r["fallback"] == "eager", r
    assert "capture failed" in r["fallback_reason"] and "not permitted" in r["fallback_reason"]
    assert "capture failed, fell back to mode eager" in r["note"] and "replays_per_step" not in r
    buf = io.StringIO()
    e2e_report.print_table(suite.rows, file=buf)
    assert "| eager (fell back from captured) |" in buf.getvalue()


# ------------------------------------------------------------------------------- rwp-fast bench (user)
def test_user_bench_smoke_table_json_and_png(tmp_path, capsys):
    """`rwp-fast bench --smoke` on CPU: the table, the JSON schema, a valid PNG; no MFU on CPU."""
    from rwp_fast import cli
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    status = cli.main(["bench", "--device", "cpu", "--smoke", "--no-progress", "--json", str(out),
                       "--plot", str(png)])
    text = capsys.readouterr().out
    assert status == 0, text[-2000:]
    assert "images/s" in text and "×released" in text and "÷AT time" in text
    assert "algorithmic savings" in text  # the CPU caveat
    with open(out) as f:
        report = json.load(f)
    assert report["schema"] == 1 and report["kind"] == "rwp-fast bench" and report["partial"] is False
    assert {"device", "torch", "triton", "cuda", "git_commit", "ceiling_tflops"} <= set(report["meta"])
    assert report["meta"]["ceiling_tflops"] is None  # no CPU "ceiling", so no MFU > 100%
    got = {(s["method"], s["variant"]) for s in report["summary"]}
    assert got == {(m, v) for m in ("at", "at-awp", "at-rwp") for v in ("released", "fast")}
    for s in report["summary"]:
        assert s["images_per_s"] > 0 and s["mfu"] is None
        assert s["time_vs_at"] is not None and s["probes"] == s["expected_probes"]
        assert s["speedup_vs_released"] is not None
    assert [s["probes"] for s in report["summary"] if s["variant"] == "fast"] == [0, 1, 3]  # AT, AWP, RWP K2=3
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 100  # width in pixels


def test_user_bench_bad_variant_is_one_line_error(capsys):
    from rwp_fast import cli
    assert cli.main(["bench", "--device", "cpu", "--variants", "fast,turbo"]) == 2
    err = capsys.readouterr().err
    assert "--variants" in err and "released" in err and "Traceback" not in err


def test_rwp_fast_bench_loads_one_copy_of_each_bench_module():
    """In a process that runs `rwp-fast bench --smoke`, every bench/ file is loaded once, as
    rwp_fast.bench.<name>, and nothing is loaded as `bench.*`. Run from the repo root, where a stray
    `import bench` would succeed and load the second copy."""
    script = (
        "import json, os, sys\n"
        "from rwp_fast import cli\n"
        "status = cli.main(['bench', '--device', 'cpu', '--smoke', '--no-progress', '--methods', 'at'])\n"
        "folder = os.path.join(os.path.realpath(sys.argv[1]), 'bench') + os.sep\n"
        "files = {n: os.path.realpath(m.__file__) for n, m in list(sys.modules.items())\n"
        "         if isinstance(getattr(m, '__file__', None), str)}\n"
        "print(json.dumps(dict(status=status, modules={n: f for n, f in files.items() if f.startswith(folder)},\n"
        "                      bare=[n for n in sys.modules if n == 'bench' or n.startswith('bench.')])))\n")
    proc = subprocess.run([sys.executable, "-c", script, ROOT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == 0 and got["bare"] == []
    modules = got["modules"]
    assert {"rwp_fast.bench", "rwp_fast.bench.bench_e2e", "rwp_fast.bench.user"} <= set(modules), modules
    assert all(n == "rwp_fast.bench" or n.startswith("rwp_fast.bench.") for n in modules), modules
    assert len(set(modules.values())) == len(modules), modules  # no file under two names


def test_a_row_is_saved_the_moment_it_is_timed_before_any_profile(tmp_path, monkeypatch):
    """The JSON holds a row's timing before anything else runs on it (on CUDA the profilers; on CPU the op
    count of an eager row stands in for them): a crash there keeps the figure and says what failed."""
    suite = _suite(["at"])
    suite.args.json = str(tmp_path / "rows.json")
    on_disk = []

    def crashing_count(*args, **kwargs):
        on_disk.extend(json.loads((tmp_path / "rows.json").read_text()))
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED (simulated)")
    monkeypatch.setattr(bench_e2e, "count_aten_ops", crashing_count)
    suite.run_unit("small_cnn", 8, "no-compile", e2e_configs.make_batches(8, "cpu"))
    (saved,) = on_disk
    steps = saved["warmup"] + saved["steps"] * saved["repeats"]
    assert saved["images_per_s"] > 0 and saved["first_step_s"] > 0 and saved["mode_counts"] == {"eager": steps}
    (r,) = json.loads((tmp_path / "rows.json").read_text())
    assert r["images_per_s"] == saved["images_per_s"]  # the figure stands
    assert "error after the timing: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in r["note"], r["note"]


def test_a_fullgraph_fallback_is_in_the_row(monkeypatch):
    """A phase that left fullgraph (FastTrainStep.fallbacks) is recorded in the row and said in its note."""
    def make_step(variant, model, cfg, device):
        step, optimizer = e2e_configs.make_step(variant, model, cfg, device)
        step.phases["attack_step"].fallback = "attack_step: fullgraph failed (Unsupported: ...); graph breaks allowed"
        return step, optimizer
    monkeypatch.setattr(bench_e2e, "make_step", make_step)
    suite = _suite(["at"])
    suite.run_unit("small_cnn", 8, "fast", e2e_configs.make_batches(8, "cpu"))
    (r,) = suite.rows
    assert r["fallbacks"] == ["attack_step: fullgraph failed (Unsupported: ...); graph breaks allowed"]
    assert "fullgraph fallback: attack_step: fullgraph failed" in r["note"]
    buf = io.StringIO()
    e2e_report.print_table(suite.rows, file=buf)
    steps = r["warmup"] + r["steps"] * r["repeats"]
    assert f"| eager {steps} |" in buf.getvalue()  # the steps by mode (CPU, not compiled: eager)
