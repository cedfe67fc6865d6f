"""``bench/device_run.sh``, the one-shot GPU run, rehearsed on the CPU (issue 29).

(a) The dry run: every part of the real order runs and says ok, the headline's fast rows compile their phases
    (aot_eager, as the GPU run compiles them with Inductor) with no fullgraph fallback, and $OUT holds at most
    8 files, each under 16 MiB (the device tool's limits); the parts' recorded seconds stay inside TOTAL_S.
(b) The rehearsal: the same run with the plan scaled down to TOTAL_S = 60 s (and to 16 s). The parts are cut
    (a Python part with its stack in run.log) or skipped, each saying so, and the script's own accounting stays
    inside TOTAL_S.
(c) A run cut partway (the whole process session killed, as the device tool does at its limit) keeps what
    finished: the install's status in results.json and summary.txt, the running part's output in run.log and
    its bench rows already timed in bench.json.
(d) The plan file (bench/device_plan.tsv) fits its TOTAL_S, and names the script's parts in the script's order.
(e) ``rwp-fast train`` logs its warm-up once, and records it in the first epoch's metrics.jsonl row.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_run.sh")
PLAN_TOTAL_S, RESERVE_S, KILL_S = 480, 5, 5  # device_run.sh: the plan's TOTAL_S, the reserve, the kill grace
ORDER = ["install", "headline", "captured", "tracking", "variants", "verify", "micro", "sanitizer"]


def plan():
    """{part: (cap_s, min_s)} of bench/device_plan.tsv, in its order."""
    out = {}
    with open(os.path.join(ROOT, "bench", "device_plan.tsv")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, cap, low = line.split()[:3]
                out[name] = (int(cap), int(low))
    return out


def dry_run(out, *args, timeout=600):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TOTAL_S", None)
    env.pop("PARTS", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def load(path):
    with open(path) as f:
        return json.load(f)


def check_accounting(results, total_s, wall_s):
    """The parts' recorded seconds sum inside TOTAL_S; none ran past its limit by more than timeout's kill
    grace, and no limit is over the part's scaled cap; the wall time ends within TOTAL_S + slack."""
    caps = plan()
    assert results["total_s"] == total_s
    assert results["parts_s"] == pytest.approx(sum(p["seconds"] for p in results["parts"]), abs=0.1)
    assert results["parts_s"] <= total_s, results["parts"]
    for p in results["parts"]:
        assert p["cap_s"] == caps[p["part"]][0] * total_s // PLAN_TOTAL_S, p
        assert p["limit_s"] <= p["cap_s"] and p["seconds"] <= p["limit_s"] + KILL_S + 1, p
    assert results["wall_s"] <= total_s + 2, results["wall_s"]  # the script's own clock, before its last collect
    assert wall_s <= total_s + 15  # this test's clock: bash and the last collect included


# ------------------------------------------------------------------------------------------------- (a)
@pytest.mark.slow
def test_device_run_dry_run_on_cpu(tmp_path):
    """The GPU script end to end on CPU with tiny sizes: a shell or Python error, or a phase that does not
    compile with fullgraph on this torch, shows here, not in the short GPU time."""
    proc, wall = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and all(os.path.getsize(tmp_path / f) < 16 * 2 ** 20 for f in files), files
    assert {"run.log", "results.json", "summary.txt", "env.txt", "bench.json", "variants.json", "verify.json",
            "micro.json"} == set(files)
    results = load(tmp_path / "results.json")
    assert [p["part"] for p in results["parts"]] == ORDER  # the plan's order, by the value of what each tells
    bad = {p["part"]: p["status"] for p in results["parts"] if p["status"] != "ok"}
    assert not bad, (bad, proc.stdout[-3000:])
    assert results["running"] is None
    check_accounting(results, PLAN_TOTAL_S, wall)

    # the headline: released and fast, AT-RWP then AT; fast compiles on CPU here (aot_eager), without fallback
    headline = results["headline"]["summary"]
    assert [(s["method"], s["variant"]) for s in headline] == [
        ("at-rwp", "released"), ("at-rwp", "fast"), ("at", "released"), ("at", "fast")]
    rows = [r for r in load(tmp_path / "bench.json")["rows"] if r.get("kind") == "e2e"]
    assert [(r["variant"], r["method_key"]) for r in rows] == [
        ("released", "at-rwp-all"), ("released", "at"), ("fast", "at-rwp-all"), ("fast", "at")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["first_step_s"] > 0 and r["first_captured_step_s"] is None, r
        if r["variant"] == "fast":
            assert r["mode"] == "compiled" and r["settings"]["compile_backend"] == "aot_eager", r
            assert r["mode_counts"] == {"compiled": r["warmup"] + r["steps"] * r["repeats"]}, r
            assert r["fallbacks"] == [] and "fallback" not in r["note"], r
    variants = {(s["variant"], s["method"]): s for s in results["variants"]["summary"]}
    assert set(variants) == {(v, m) for v in ("compiled", "no-compile") for m in ("at", "at-rwp")}
    for (variant, _), s in variants.items():  # compiled runs in a CPU smoke run when a backend is named
        assert s["images_per_s"] > 0 and s["mode"] == ("compiled" if variant == "compiled" else "eager"), s
        assert not s["fallbacks"], s
    log = (tmp_path / "run.log").read_text()
    assert "torch.compile backend aot_eager" in log and "mode compiled" in log  # the compiled attack step ran
    summary = (tmp_path / "summary.txt").read_text()
    assert "first step" in summary and "steps compiled" in summary and "FALLBACK" not in summary
    assert "accounting: 8 parts ran" in summary

    assert "4 skipped" in results["captured"]  # collected by name, skipped without CUDA
    assert "1 skipped" in results["tracking"]  # the bf16 tracking test, captured mode only
    verify = load(tmp_path / "verify.json")
    assert verify["verdict"] == "PASS" and verify["partial"] is False
    assert {r["op"] for r in verify["rows"]} <= {"lsc_loss"} and verify["steps"]
    assert all(s["mode_counts"]["fp64"] == {"eager": s["step"]} for s in verify["steps"])
    assert results["sanitizer"].startswith("not supported")
    assert any(r["impl"] == "triton" and r["us_p50"] for r in results["micro"])
    assert "collect errors" not in proc.stdout


# ------------------------------------------------------------------------------------------------- (b)
@pytest.mark.slow
def test_rehearsal_with_the_plan_scaled_down_stays_inside_total_s(tmp_path):
    """TOTAL_S = 60: every cap is an eighth of the GPU plan's. Parts are cut at their limit or skipped when
    less than their minimum is left, each with its status; the accounting stays inside TOTAL_S."""
    proc, wall = dry_run(tmp_path, "--total-s", "60", timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = load(tmp_path / "results.json")
    assert [p["part"] for p in results["parts"]] == ORDER
    for p in results["parts"]:
        assert p["status"] == "ok" or p["status"].startswith(("TIMED OUT", "skipped: ")), p
    check_accounting(results, 60, wall)
    # a Python part cut at its limit gets SIGABRT: faulthandler prints where it was into run.log
    log = (tmp_path / "run.log").read_text()
    for p in results["parts"]:
        if p["status"].startswith("TIMED OUT") and p["part"] in ("headline", "variants", "verify"):
            section = log.split(f"==== part {p['part']} start", 1)[1].split(f"==== part {p['part']} end", 1)[0]
            assert "Fatal Python error: Aborted" in section and "(most recent call first)" in section, section
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"accounting: \d parts ran, [\d.]+s of TOTAL_S=60s", summary), summary


def test_a_part_without_its_minimum_left_is_skipped_and_says_so(tmp_path):
    """TOTAL_S = 16: after install and the headline's few seconds no part has its minimum left; each is
    skipped with the seconds left and the seconds it needs, and the accounting still holds."""
    proc, wall = dry_run(tmp_path, "16", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = load(tmp_path / "results.json")
    parts = {p["part"]: p for p in results["parts"]}
    assert list(parts) == ORDER
    skipped = [p for p in results["parts"] if p["status"].startswith("skipped: ")]
    assert skipped and all(p["seconds"] == 0 and p["limit_s"] == 0 for p in skipped), results["parts"]
    assert any("left of TOTAL_S=16s, the plan needs" in p["status"] for p in skipped), results["parts"]
    # the last part's cap scales to 0 s: skipped, never run under 'timeout 0' (which is no limit at all)
    assert parts["sanitizer"]["status"] == "skipped: the plan gives it 0s at TOTAL_S=16s"
    check_accounting(results, 16, wall)
    assert "skipped: " in (tmp_path / "summary.txt").read_text()


# ------------------------------------------------------------------------------------------------- (c)
def _session_pids(sid):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                pids.append(int(name))
    return pids


def test_a_run_cut_partway_keeps_what_finished(tmp_path):
    """Kill the dry run (its whole session: timeout gives each part its own process group) once the headline
    has timed its first row: the finished install part is in results.json and summary.txt, the headline's
    output so far is in run.log, and its timed row is in bench.json."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("PARTS", None)
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    bench = tmp_path / "bench.json"
    try:
        deadline = time.monotonic() + 300
        rows = []
        while time.monotonic() < deadline and proc.poll() is None:
            if bench.exists():
                try:
                    rows = [r for r in load(bench)["rows"] if r.get("images_per_s")]
                except ValueError:  # never expected: the file is replaced whole
                    raise AssertionError("bench.json was read half-written")
                if rows:
                    break
            time.sleep(0.2)
        assert rows, "the headline timed no row within 300 s"
    finally:
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    report = load(bench)
    assert report["partial"] is True and report["rows"][0]["variant"] == "released"
    assert report["rows"][0]["first_step_s"] > 0 and report["summary"][0]["images_per_s"] > 0
    results = load(tmp_path / "results.json")
    assert [(p["part"], p["status"]) for p in results["parts"]] == [("install", "ok")]
    assert "install: ok" in (tmp_path / "summary.txt").read_text()
    log = (tmp_path / "run.log").read_text()
    assert "==== part install end: ok" in log and "==== part headline start" in log
    assert "==== part headline end" not in log and "released" in log  # streamed while it ran
    assert (tmp_path / "env.txt").exists()


# ------------------------------------------------------------------------------------------------- (d)
def test_the_plan_fits_total_s_and_names_the_parts_in_the_scripts_order():
    caps = plan()
    ran = [p for p in caps if p != "install_without_cuda_ext"]  # that one only after a failed install
    assert ran == ORDER
    assert sum(caps[p][0] for p in ran) <= PLAN_TOTAL_S - 2 * RESERVE_S  # the reserve and the kill grace
    assert all(0 < low <= cap for cap, low in caps.values())
    with open(SCRIPT) as f:
        script = f.read()
    called = re.findall(r"^\s*(?:elif ! |if ! )?part (\w+) ", script, re.M)
    assert list(dict.fromkeys(called)) == ["install", "install_without_cuda_ext"] + ORDER[1:], called
    for setting in ("TORCH_LOGS", "PYTHONFAULTHANDLER=1", "RWP_FAST_COMPILE_BACKEND"):
        assert setting in script


# ------------------------------------------------------------------------------------------------- (e)
def test_train_logs_its_warm_up_once(tmp_path):
    from rwp_fast.config import RunConfig
    from rwp_fast.train.trainer import Trainer
    cfg = RunConfig(dataset="digits", model="small_cnn", epsilon_255=32.0, alpha_255=8.0, attack_steps=1,
                    eval_attack_steps=1, perturb="none", epochs=2, batch_size=32, lr=0.05, train_examples=64,
                    eval_examples=32, out_dir=str(tmp_path / "run"), quiet=True, device="cpu").validate()
    lines = []
    rows = Trainer(cfg, log=lines.append).fit()
    warm = [line for line in lines if line.startswith("warm-up:")]
    assert len(warm) == 1 and "first step ended after" in warm[0] and "step mode eager" in warm[0], lines
    assert rows[0]["first_step_s"] > 0 and "first_step_s" not in rows[1]
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        assert "first_step_s" in json.loads(f.readline())
