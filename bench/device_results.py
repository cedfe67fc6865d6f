"""Assemble the device run's files under $OUT (bench/device_run.sh calls this after every part).

Standard library only, so that it works whatever state the install is in. Reads the parts' statuses
($WORK/status.tsv), their outputs under $OUT (run.log, bench.json, variants.json, verify.json) and the micro
JSONs ($WORK/micro_*.json). Writes:
  results.json  one object: run metadata, the plan's accounting (each part's status, seconds, limit and cap;
                their sum and the wall time against TOTAL_S), the verify verdict and its FAIL rows, the bench
                summaries (images/s, ×released, RWP/AT time, probes, MFU, the steps by mode and any fallback,
                seconds to the first step and to the first captured step, phase replays per step,
                host/GPU/GPU-busy ms per step, cudagraph skips), the microbenchmark rows (with % of copy
                bandwidth), the outcome of the captured, tracking and sanitizer parts; ready for bench/results/
  summary.txt   the same in a few lines
  micro.json    the three op microbenchmarks' rows merged
and keeps every file under $OUT below MAX_BYTES (16 MiB): run.log keeps its head and its tail, another file
its head.
"""

import argparse
import glob
import json
import os
import re
import time

MAX_BYTES = 16 * 2 ** 20
LOG_HEAD = 2 * 2 ** 20  # what an oversize run.log keeps of its start; the rest of MAX_BYTES is its end
SECTION = re.compile(r"^==== part (\S+) start ", re.M)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path, n=MAX_BYTES):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            text = f.read().decode("utf-8", "replace")
        return ("[... %d bytes cut ...]\n" % (size - n) if size > n else "") + text
    except OSError:
        return None


def parts_status(work):
    """[{part, status, seconds, limit_s, cap_s}] of the parts that ended or were skipped, in order."""
    rows = []
    try:
        with open(os.path.join(work, "status.tsv")) as f:
            for line in f:
                name, status, seconds, limit, cap = (line.rstrip("\n").split("\t") + [""] * 4)[:5]
                rows.append(dict(part=name, status=status, seconds=float(seconds or 0), limit_s=int(limit or 0),
                                 cap_s=int(cap or 0)))
    except OSError:
        pass
    return rows


def part_logs(out):
    """{part: its section of run.log} (the script writes '==== part NAME start ...' before each part)."""
    text = _tail(os.path.join(out, "run.log"), MAX_BYTES) or ""
    starts = [(m.start(), m.group(1)) for m in SECTION.finditer(text)] + [(len(text), None)]
    return {name: text[a:b] for (a, name), (b, _) in zip(starts, starts[1:])}


def running_part(logs, parts):
    """The part whose section began but that has no status (cut while it ran), or None."""
    ended = {p["part"] for p in parts}
    begun = [name for name in logs if name not in ended]
    return begun[-1] if begun else None


def verify_summary(report):
    if not report:
        return None
    return dict(verdict=report.get("verdict"), fails=report.get("fails"), known=report.get("known"),
                checks=report.get("checks"), backends=report.get("backends_checked"), dtypes=report.get("dtypes"),
                skipped=report.get("skipped"), seconds=report.get("seconds"),
                not_passed=[{k: r.get(k) for k in ("op", "function", "backend", "dtype", "family", "output",
                                                   "worst_abs", "worst_rel", "worst_ulp", "tolerance", "status",
                                                   "note")}
                            for r in report.get("rows", []) if r.get("status") != "PASS"],
                worst=[{k: r.get(k) for k in ("op", "function", "backend", "dtype", "family", "output",
                                              "worst_abs", "worst_ulp", "tolerance")}
                       for r in report.get("rows", [])],
                steps=report.get("steps"), meta=report.get("meta"))


def bench_summary(report):
    if not report:
        return None
    return dict(summary=report.get("summary"), meta=report.get("meta"),
                targets=[r for r in report.get("rows", []) if r.get("kind") in ("target", "ratio")])


def sanitizer_outcome(text):
    lines = [ln for ln in (text or "").splitlines() if ln.startswith("SANITIZER:")]
    return lines[-1][len("SANITIZER:"):].strip() if lines else "no outcome (part not run or killed)"


def pytest_outcome(text):
    """The pytest summary line of a tests part, or the verdicts -v printed before it was cut."""
    text = text or ""
    lines = [ln for ln in text.splitlines() if ln.startswith("=") and
             any(w in ln for w in (" passed", " failed", " skipped", " error", " deselected"))]
    if lines:
        return lines[-1].strip()
    # cut at its limit before pytest's summary: the per-test verdicts that -v printed so far
    verdicts = [ln.split(" ")[0].split("::")[-1] + " " + w for ln in text.splitlines()
                for w in ("PASSED", "FAILED", "ERROR", "SKIPPED") if f" {w}" in ln]
    return ("cut before the summary: " + ", ".join(verdicts)) if verdicts else "no outcome (part not run or killed)"


def _modes(counts):
    """{'captured': 15} or {'fp64': {'eager': 2}} -> one short text."""
    if not counts:
        return "-"
    return ", ".join(f"{k} {_modes(v) if isinstance(v, dict) else v}" for k, v in counts.items())


def cap_run_log(path):
    """run.log over MAX_BYTES keeps its first LOG_HEAD bytes and its last ones (between parts: no writer)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size <= MAX_BYTES:
        return
    with open(path, "rb") as f:
        head = f.read(LOG_HEAD)
        f.seek(size - (MAX_BYTES - LOG_HEAD - 200))
        tail = f.read()
    with open(path, "wb") as f:
        f.write(head + f"\n[... run.log: {size} bytes, the middle cut to stay under {MAX_BYTES} ...]\n".encode()
                + tail)


def _ms(value):
    return "-" if value is None else f"{value:.1f}"


def _s(value):
    return "-" if value is None else f"{value:.1f}s"


def write_capped(path, text):
    data = text.encode()
    if len(data) > MAX_BYTES:
        data = (f"{os.path.basename(path)}: {len(data)} bytes, over the {MAX_BYTES}-byte cap; the head follows\n"
                .encode() + data[:MAX_BYTES - 200])
    with open(path, "wb") as f:
        f.write(data)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--dry-run", default="0")
    p.add_argument("--total-s", type=int, default=None, help="the run's TOTAL_S")
    p.add_argument("--wall-s", type=float, default=None, help="seconds since the script started")
    a = p.parse_args(argv)
    micro = []
    for path in sorted(glob.glob(os.path.join(a.work, "micro_*.json"))):
        micro += _load(path) or []
    if micro:
        write_capped(os.path.join(a.out, "micro.json"), json.dumps(micro, indent=1))
    cap_run_log(os.path.join(a.out, "run.log"))
    env = _tail(os.path.join(a.out, "env.txt")) or ""
    parts, logs = parts_status(a.work), part_logs(a.out)
    ran = [p for p in parts if not p["status"].startswith("skipped")]
    results = dict(
        kind="device_run", schema=2, dry_run=a.dry_run == "1",
        note="dry run on CPU: checks the script, claims no figure" if a.dry_run == "1" else "GPU run",
        written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), env=env.strip().splitlines(),
        total_s=a.total_s, wall_s=a.wall_s, parts_s=round(sum(p["seconds"] for p in parts), 1),
        parts=parts, running=running_part(logs, parts),
        verify=verify_summary(_load(os.path.join(a.out, "verify.json"))),
        headline=bench_summary(_load(os.path.join(a.out, "bench.json"))),
        variants=bench_summary(_load(os.path.join(a.out, "variants.json"))),
        captured=pytest_outcome(logs.get("captured")),
        tracking=pytest_outcome(logs.get("tracking")),
        micro=[{k: r.get(k) for k in ("op", "case", "impl", "us_p50", "us_p20", "us_p80", "speedup_vs_eager", "gbps",
                                      "pct_of_copy", "copy_gbps", "note")} for r in micro],
        sanitizer=sanitizer_outcome(logs.get("sanitizer")),
    )
    write_capped(os.path.join(a.out, "results.json"), json.dumps(results, indent=1))

    lines = [f"{r['part']}: {r['status']} ({r['seconds']:g}s; limit {r['limit_s']}s, cap {r['cap_s']}s)"
             for r in parts]
    if results["running"]:
        lines.append(f"{results['running']}: running (or cut) at the last rebuild; its output so far is in run.log")
    lines.append(f"accounting: {len(ran)} parts ran, {results['parts_s']:g}s of TOTAL_S={a.total_s}s; "
                 f"wall {a.wall_s}s")
    for name in ("headline", "variants"):
        b = results[name]
        for s in (b or {}).get("summary") or []:
            if s.get("images_per_s") is None:  # skipped or failed: the reason instead of empty figures
                lines.append(f"{name}: {s['method']:<7} {s['variant']:<16} no figure: {s.get('note') or '-'}")
                continue
            mfu = "-" if s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"
            ratio = "-" if s.get("speedup_vs_released") is None else f"{s['speedup_vs_released']:.2f}"
            busy = "-" if s.get("gpu_busy_fraction") is None else f"{100 * s['gpu_busy_fraction']:.0f}%"
            mode = (s.get("mode") or "-") + (" (FALLBACK from captured)" if s.get("fallback") else "")
            replays = "-" if s.get("replays_per_step") is None else \
                f"{s['replays_per_step']:g}/{s.get('expected_replays_per_step')}"
            lines.append(f"{name}: {s['method']:<7} {s['variant']:<16} {s['images_per_s'] or 0:9.1f} img/s  "
                         f"×released {ratio}  ÷AT {s['time_vs_at'] or 0:.2f}  "
                         f"probes {s['probes']}  MFU {mfu}  mode {mode}  steps {_modes(s.get('mode_counts'))}  "
                         f"first step {_s(s.get('first_step_s'))}  "
                         f"first captured {_s(s.get('first_captured_step_s'))}  "
                         f"replays/step {replays}  "
                         f"host/GPU/busy ms {_ms(s.get('host_ms_per_step'))}/{_ms(s.get('gpu_ms_per_step'))}/"
                         f"{_ms(s.get('gpu_busy_ms_per_step'))}  GPU busy {busy}  "
                         f"skips {'-' if s.get('cudagraph_skips') is None else s['cudagraph_skips']}"
                         + "".join(f"  FALLBACK {f}" for f in s.get("fallbacks") or []))
    lines.append(f"captured: {results['captured']}")
    lines.append(f"tracking: {results['tracking']}")
    v = results["verify"]
    if v:
        lines.append(f"verify: {v['verdict']}, {v['checks']} checks on {v['backends']} × {v['dtypes']}: "
                     f"{v['fails']} FAIL, {v['known']} KNOWN")
        lines += [f"  {r['status']} {r['op']} {r['function']} {r['backend']} {r['dtype']} {r['family']}: {r['note']}"
                  for r in v["not_passed"][:30]]
        lines += [f"  skipped: {s['what']}: {s['reason']}" for s in v["skipped"] or []]
        lines += [f"  step {s['step']} {s['method']}: rel {s['weight_rel_divergence']:.1e} {s['status']}"
                  + (f"; modes {_modes(s.get('mode_counts'))}" if s.get("mode_counts") else "")
                  + "".join(f"; FALLBACK {f}" for f in s.get("fallbacks") or []) for s in v["steps"] or []]
    for r in results["micro"]:
        lines.append(f"micro: {r['op']:<15}{r['case']:<32}{r['impl']:<12}"
                     + (f"{r['us_p50']:9.1f} us {r['pct_of_copy'] or '-'}% of copy" if r["us_p50"] is not None
                        else str(r["note"])))
    lines.append(f"sanitizer: {results['sanitizer']}")
    write_capped(os.path.join(a.out, "summary.txt"), "\n".join(lines) + "\n")

    for path in glob.glob(os.path.join(a.out, "*")):  # the raw JSONs too: never over the cap
        if os.path.isfile(path) and os.path.getsize(path) > MAX_BYTES:
            with open(path, "rb") as f:
                head = f.read(MAX_BYTES - 200)
            write_capped(path, head.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
