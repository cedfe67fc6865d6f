"""``rwp-fast verify`` on the CPU (Triton interpreter): it passes on the real kernels, it reports FAIL and
exits 1 when a backend function it calls is broken on purpose (mask ``<=`` instead of ``<``, L∞ sign(0)
changed, one axpy element skipped), and a missing backend is listed as skipped, not passed.

The mutations monkeypatch the very backend function that the check reaches through ``rwp_fast.ops``
(``dispatch.backend_module(...)`` looks it up per call), so each test proves that verify would catch it.
"""

import json

import pytest
import torch

from rwp_fast import cli
from rwp_fast.ops import dispatch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/interpreter form of verify")


def run_verify(tmp_path, *flags):
    path = tmp_path / "verify.json"
    status = cli.main(["verify", "--device", "cpu", "--quick", "--json", str(path), *flags])
    with open(path) as f:
        return status, json.load(f)


def failing(report):
    return {(r["op"], r["function"], r["family"]) for r in report["rows"] if r["status"] == "FAIL"}


def test_verify_passes_on_the_real_kernels(tmp_path, capsys):
    status, report = run_verify(tmp_path)
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    assert report["verdict"] == "PASS" and report["fails"] == 0
    assert report["backends_checked"] == ["triton"]
    functions = {(r["op"], r["function"]) for r in report["rows"]}
    for op, fn in [("pgd_step", "step linf"), ("pgd_step", "step l2"), ("pgd_step", "random start l2"),
                   ("lsc_loss", "ce"), ("lsc_loss", "trades"), ("weight_perturb", "segment_sq_norm"),
                   ("weight_perturb", "accumulate_sq_norm_ β"), ("weight_perturb", "perturb_axpy_ -1"),
                   ("weight_perturb", "perturb_scale global")]:
        assert (op, fn) in functions
    for r in report["rows"]:
        assert r["tolerance"] and r["why"] and "worst_ulp" in r
    meta = report["meta"]
    for key in ("device", "driver", "torch", "triton", "cuda", "commit"):
        assert key in meta
    # CPU/--quick says what it left out
    assert any("prime" in s["what"] for s in report["skipped"])
    assert "verify: PASS" in out


def test_mask_made_less_or_equal_fails(tmp_path, monkeypatch):
    kernel = dispatch.backend_module("triton", "lsc_loss")
    real = kernel.lsc_loss_fwd

    def mutated(logits, target, p, q):
        loss, mask, count, mean, lse = real(logits, target, p, q)
        mask = (loss >= p) & (loss <= q)  # the planted bug: an inclusive upper bound
        return loss, mask, mask.sum().to(count.dtype), (loss * mask).sum() / loss.shape[0], lse
    monkeypatch.setattr(kernel, "lsc_loss_fwd", mutated)
    status, report = run_verify(tmp_path, "--ops", "lsc_loss", "--families", "boundary")
    assert status == 1 and report["verdict"] == "FAIL"
    assert ("lsc_loss", "ce", "mask boundary") in failing(report)


def test_linf_sign_of_zero_changed_fails(tmp_path, monkeypatch):
    kernel = dispatch.backend_module("triton", "pgd_step")
    real = kernel.pgd_step

    def mutated(x_adv, grad, x_nat, alpha, eps, norm, out):
        if norm == "linf":  # the planted bug: sign(0) = +1
            grad = torch.where(grad == 0, torch.ones_like(grad), grad)
        return real(x_adv, grad, x_nat, alpha, eps, norm, out)
    monkeypatch.setattr(kernel, "pgd_step", mutated)
    status, report = run_verify(tmp_path, "--ops", "pgd_step", "--families", "random")
    assert status == 1
    assert ("pgd_step", "step linf", "random") in failing(report)
    assert ("pgd_step", "step l2", "random") not in failing(report)


def test_one_axpy_element_skipped_fails(tmp_path, monkeypatch):
    kernel = dispatch.backend_module("triton", "weight_perturb")
    real = kernel.perturb_axpy_

    def mutated(w, a, scale, table, sign):
        last = w[-1].clone()
        real(w, a, scale, table, sign)
        w[-1] = last  # the planted bug: the tail element is never written
        return w
    monkeypatch.setattr(kernel, "perturb_axpy_", mutated)
    status, report = run_verify(tmp_path, "--ops", "weight_perturb", "--families", "odd")
    assert status == 1
    assert ("weight_perturb", "perturb_axpy_ +1", "odd sizes") in failing(report)
    assert ("weight_perturb", "segment_sq_norm", "odd sizes") not in failing(report)


def test_missing_backend_is_skipped_not_passed(tmp_path, monkeypatch):
    real_load = dispatch._load

    def no_triton(backend, op):
        if backend == "triton":
            raise ImportError("No module named 'triton' (simulated)")
        return real_load(backend, op)
    monkeypatch.setattr(dispatch, "_load", no_triton)
    status, report = run_verify(tmp_path, "--ops", "weight_perturb", "--families", "odd")
    assert status == 0  # missing is not a failure ...
    assert report["rows"] == [] and report["backends_checked"] == []
    skipped = {s["what"]: s["reason"] for s in report["skipped"]}
    assert "simulated" in skipped["backend triton"] and "CUDA" in skipped["backend cuda"]
    status, report = run_verify(tmp_path, "--ops", "weight_perturb", "--families", "odd", "--require", "triton")
    assert status == 1  # ... unless it is required
    assert [r["backend"] for r in report["rows"] if r["status"] == "FAIL"] == ["triton"]


def test_whole_step_check(tmp_path, monkeypatch):
    """--steps K: K fast vs reference steps in float64 for AT, AT-AWP, AT-RWP, one row per step, with the fp32
    drift from fp64 beside the verdict; here with no kernel backend (cuda is absent on CPU), so the fast step
    runs its torch ops: seconds. A fast step that leaves the perturbation in the weights (v never removed) is
    reported FAIL."""
    from rwp_fast.verify.steps import FP64_STEP_RTOL
    status, report = run_verify(tmp_path, "--backends", "cuda", "--steps", "2")
    assert status == 0
    assert [(s["method"], s["step"]) for s in report["steps"]] == [
        (m, k) for m in ("at", "at-awp", "at-rwp") for k in (1, 2)]
    assert all(s["status"] == "PASS" and s["weight_rel_divergence"] < FP64_STEP_RTOL for s in report["steps"])
    # the drift is a figure, reported: an fp32 step is a few ulps (≥ 1e-9) from fp64, and far from a bug
    assert all(1e-12 < s["fp32_weight_drift"] < 1e-3 and "bf16_weight_drift" not in s for s in report["steps"])
    # the mode each step ran in (FastTrainStep.mode_counts, so far in that method's run): eager here, no fallback
    assert all(s["mode_counts"] == {"fp64": {"eager": s["step"]}, "fp32": {"eager": s["step"]}}
               and s["fallbacks"] == [] for s in report["steps"]), report["steps"]

    from rwp_fast.perturb.search import WeightPerturbation
    monkeypatch.setattr(WeightPerturbation, "remove", lambda self: None)  # v stays in the weights
    status, report = run_verify(tmp_path, "--backends", "cuda", "--steps", "1")
    assert status == 1
    assert {s["method"] for s in report["steps"] if s["status"] == "FAIL"} == {"at-awp", "at-rwp"}


def test_a_filter_that_selects_no_check_fails_rather_than_passes(tmp_path):
    """`--families` with a typo selects nothing: verify must not call 0 checks a PASS."""
    status, report = run_verify(tmp_path, "--ops", "pgd_step", "--families", "nosuchfamily")
    assert status == 1
    assert [r["function"] for r in report["rows"] if r["status"] == "FAIL"] == ["(no checks)"]


def test_the_json_is_written_after_every_op_and_step_check(tmp_path, monkeypatch):
    """A run cut short keeps every result it made: --json is rewritten (whole: written aside, then renamed)
    after each op × backend × dtype and after each step check, marked partial until the end."""
    from rwp_fast.verify import run
    written = []
    real = run.write_json

    def recording(report, path):
        real(report, path)
        with open(path) as f:
            written.append(json.load(f))
    monkeypatch.setattr(run, "write_json", recording)
    status, report = run_verify(tmp_path, "--ops", "pgd_step,weight_perturb", "--families", "odd",
                                "--steps", "1")
    assert status == 0 and report["partial"] is False and report["verdict"] == "PASS"
    ops = [{r["op"] for r in w["rows"]} for w in written]
    assert ops[:2] == [{"pgd_step"}, {"pgd_step", "weight_perturb"}]  # one write per op, in order
    assert all(w["partial"] and w["verdict"] == "INCOMPLETE" for w in written[:-1])
    assert [len(w["steps"]) for w in written[2:-1]] == [1, 2, 3]  # then one per step check (AT, AWP, RWP)
    assert written[-1] == report and not list(tmp_path.glob("*.tmp"))
