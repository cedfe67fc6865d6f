"""Assemble the device run's files under $OUT (bench/device_run.sh calls this after every part).

Standard library only, so that it works whatever state the install is in. Writes:
  results.json  one object: run metadata, the status of every part, the verify verdict and its FAIL rows,
                the bench summary (images/s, ×released, RWP/AT time, probes, MFU, the step's mode and a capture
                fallback, phase replays per step, host/GPU/GPU-busy ms per step, cudagraph skips), the
                microbenchmark rows (with % of copy bandwidth), the sanitizer and tracking outcome; ready for
                bench/results/
  summary.txt   the same in a few lines
  logs.txt      the last LOG_TAIL bytes of every part's log
  micro.json    the three op microbenchmarks' rows merged
and caps every file under $OUT at MAX_BYTES (16 MiB), replacing an oversize one with a stub that says so.
"""

import argparse
import glob
import json
import os
import time

MAX_BYTES = 16 * 2 ** 20
LOG_TAIL = 200_000
PARTS = ("install", "install_without_cuda_ext", "verify", "sanitizer", "headline", "extras", "micro", "tracking")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path, n=LOG_TAIL):
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
    rows = []
    try:
        with open(os.path.join(work, "status.tsv")) as f:
            for line in f:
                name, status, seconds, limit = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
                rows.append(dict(part=name, status=status, seconds=int(seconds or 0), limit_s=int(limit or 0)))
    except OSError:
        pass
    return rows


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


def sanitizer_outcome(work):
    text = _tail(os.path.join(work, "sanitizer.log")) or ""
    lines = [ln for ln in text.splitlines() if ln.startswith("SANITIZER:")]
    return lines[-1][len("SANITIZER:"):].strip() if lines else "no outcome (part not run or killed)"


def tracking_outcome(work):
    text = _tail(os.path.join(work, "tracking.log")) or ""
    lines = [ln for ln in text.splitlines() if any(w in ln for w in ("passed", "failed", "skipped", "error"))]
    if lines:
        return lines[-1].strip()
    # cut at its limit before pytest's summary: the per-test verdicts that -v printed so far
    verdicts = [ln.split(" ")[0].split("::")[-1] + " " + w for ln in text.splitlines()
                for w in ("PASSED", "FAILED", "ERROR", "SKIPPED") if f" {w}" in ln]
    return ("cut before the summary: " + ", ".join(verdicts)) if verdicts else "no outcome (part not run or killed)"


def _ms(value):
    return "-" if value is None else f"{value:.1f}"


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
    a = p.parse_args(argv)
    micro = []
    for path in sorted(glob.glob(os.path.join(a.work, "micro_*.json"))):
        micro += _load(path) or []
    if micro:
        write_capped(os.path.join(a.out, "micro.json"), json.dumps(micro, indent=1))
    env = _tail(os.path.join(a.out, "env.txt")) or ""
    results = dict(
        kind="device_run", schema=1, dry_run=a.dry_run == "1",
        note="dry run on CPU: checks the script, claims no figure" if a.dry_run == "1" else "GPU run",
        written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), env=env.strip().splitlines(),
        parts=parts_status(a.work),
        verify=verify_summary(_load(os.path.join(a.out, "verify.json"))),
        sanitizer=sanitizer_outcome(a.work),
        headline=bench_summary(_load(os.path.join(a.out, "bench.json"))),
        extras=bench_summary(_load(os.path.join(a.out, "extras.json"))),
        micro=[{k: r.get(k) for k in ("op", "case", "impl", "us_p50", "us_p20", "us_p80", "speedup_vs_eager", "gbps",
                                      "pct_of_copy", "copy_gbps", "note")} for r in micro],
        tracking=tracking_outcome(a.work),
    )
    write_capped(os.path.join(a.out, "results.json"), json.dumps(results, indent=1))

    lines = [f"{r['part']}: {r['status']} ({r['seconds']}s of {r['limit_s']}s)" for r in results["parts"]]
    v = results["verify"]
    if v:
        lines.append(f"verify: {v['verdict']}, {v['checks']} checks on {v['backends']} × {v['dtypes']}: "
                     f"{v['fails']} FAIL, {v['known']} KNOWN")
        lines += [f"  {r['status']} {r['op']} {r['function']} {r['backend']} {r['dtype']} {r['family']}: {r['note']}"
                  for r in v["not_passed"][:30]]
        lines += [f"  skipped: {s['what']}: {s['reason']}" for s in v["skipped"] or []]
        lines += [f"  step {s['step']} {s['method']}: rel {s['weight_rel_divergence']:.1e} {s['status']}"
                  for s in v["steps"] or []]
    lines.append(f"sanitizer: {results['sanitizer']}")
    for name in ("headline", "extras"):
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
                         f"probes {s['probes']}  MFU {mfu}  mode {mode}  replays/step {replays}  "
                         f"host/GPU/busy ms {_ms(s.get('host_ms_per_step'))}/{_ms(s.get('gpu_ms_per_step'))}/"
                         f"{_ms(s.get('gpu_busy_ms_per_step'))}  GPU busy {busy}  "
                         f"skips {'-' if s.get('cudagraph_skips') is None else s['cudagraph_skips']}")
    for r in results["micro"]:
        lines.append(f"micro: {r['op']:<15}{r['case']:<32}{r['impl']:<12}"
                     + (f"{r['us_p50']:9.1f} us {r['pct_of_copy'] or '-'}% of copy" if r["us_p50"] is not None
                        else str(r["note"])))
    lines.append(f"tracking: {results['tracking']}")
    write_capped(os.path.join(a.out, "summary.txt"), "\n".join(lines) + "\n")

    logs = []
    for name in PARTS:
        text = _tail(os.path.join(a.work, f"{name}.log"))
        if text is not None:
            logs.append(f"==================== {name} ====================\n{text}")
    write_capped(os.path.join(a.out, "logs.txt"), "\n".join(logs))
    for path in glob.glob(os.path.join(a.out, "*")):  # the raw JSONs too: never over the cap
        if os.path.isfile(path) and os.path.getsize(path) > MAX_BYTES:
            with open(path, "rb") as f:
                head = f.read(MAX_BYTES - 200)
            write_capped(path, head.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
