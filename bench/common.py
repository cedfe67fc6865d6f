"""Shared helpers of the microbenchmarks ``bench/bench_<op>.py``: timing, run metadata, JSON and table.

Two modes, as the op benchmarks use them:
  * GPU: ``python -m rwp_fast.bench.bench_<op> --device cuda --json OUT.json`` times every implementation with
    ``triton.testing.do_bench`` (median and the 0.2/0.8 quantiles, in µs) against baselines measured in
    the same process: the eager torch reference, ``torch.compile`` of it, and, where they apply, torch
    ``_foreach_*`` and a per-layer loop.
  * CPU smoke: pytest collects ``bench_*.py`` (pyproject.toml) and runs each implementation once on tiny
    sizes through pytest-benchmark (``--benchmark-disable``); the Triton kernels then run under
    ``TRITON_INTERPRET=1``.

Import this module before anything imports a Triton kernel: without CUDA it turns the interpreter on.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

QUANTILES = (0.5, 0.2, 0.8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backend_error(name, device, op):
    """None if rwp_fast backend `name` ('triton' or 'cuda') can run `op` on `device`, else why not."""
    from rwp_fast.ops import dispatch
    try:
        dispatch.choose_backend(op, torch.device(device), name)
    except (ImportError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def fused_backends(device, op):
    """[(name, None | reason it is unavailable)] for the fused backends of `op`."""
    return [(name, backend_error(name, device, op)) for name in ("triton", "cuda")]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_us(fn, device, warmup_ms=25, rep_ms=100):
    """(p50, p20, p80) of one call of fn, in µs.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls). CPU: wall clock of
    repeated calls, for a rough figure only.
    """
    if torch.device(device).type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return tuple(1e3 * m for m in ms)
    fn()
    samples, deadline = [], time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < deadline or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        samples.append(1e6 * (time.perf_counter() - t0))
    qs = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: qs[1] = 0.2, qs[7] = 0.8
    return statistics.median(samples), qs[1], qs[7]


def copy_bandwidth_gbps(device, mib=512):
    """Measured ceiling: GB/s of a large device-to-device copy (bytes read + written)."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    p50 = time_us(lambda: dst.copy_(src), device)[0]
    return 2 * src.numel() * 4 / (p50 * 1e-6) / 1e9


def run_metadata(device):
    """What every JSON row records: device, versions, date, commit, command."""
    from rwp_fast._env import git_commit, triton_version
    dev = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit() or "unknown",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "copy_gbps": copy_bandwidth_gbps(device),
    }


def make_row(meta, op, case, impl, times_us, bytes_moved, baseline_us=None, note=""):
    p50, p20, p80 = times_us
    gbps = bytes_moved / (p50 * 1e-6) / 1e9
    return {
        **meta, "op": op, "case": case, "impl": impl,
        "us_p50": round(p50, 2), "us_p20": round(p20, 2), "us_p80": round(p80, 2),
        "speedup_vs_eager": round(baseline_us / p50, 3) if baseline_us else None,
        "bytes": int(bytes_moved), "gbps": round(gbps, 1),
        "pct_of_copy": round(100 * gbps / meta["copy_gbps"], 1) if meta.get("copy_gbps") else None,
        "note": note,
    }


def skipped_row(meta, op, case, impl, reason):
    return {**meta, "op": op, "case": case, "impl": impl, "us_p50": None, "note": f"skipped: {reason}"}


def try_compile(fn):
    """torch.compile(fn), or None with the reason when compilation is unavailable."""
    try:
        return torch.compile(fn), None
    except Exception as exc:  # noqa: BLE001  any failure just removes this baseline from the table
        return None, f"{type(exc).__name__}: {exc}"


def run_impl(meta, op, case, impl, fn, device, bytes_moved, baseline_us=None, check=None):
    """Time fn (after an optional correctness `check()` that raises) and return a row; a failure becomes
    a skipped row with its reason, so one broken implementation does not stop the benchmark."""
    try:
        if check is not None:
            check()
        sync(device)
        times = time_us(fn, device)
    except Exception as exc:  # noqa: BLE001
        return skipped_row(meta, op, case, impl, f"{type(exc).__name__}: {str(exc)[:300]}")
    return make_row(meta, op, case, impl, times, bytes_moved, baseline_us)


def write_json(rows, path):
    if not path:
        return
    from rwp_fast._fs import atomic_write
    # atomic: a run killed mid-write leaves the previous whole file; its temporary name fits NAME_MAX
    atomic_write(path, lambda f: json.dump(rows, f, indent=1), mode="w")


def print_table(rows, file=None):
    """One line per (case, impl): µs p50 [p20, p80], speedup vs eager, GB/s, % of the copy ceiling."""
    file = file or sys.stdout
    print(f"{'op':<15}{'case':<28}{'impl':<16}{'us p50':>10}{'[p20, p80]':>20}{'x eager':>9}{'GB/s':>9}"
          f"{'%copy':>7}", file=file)
    for r in rows:
        if r.get("us_p50") is None:
            print(f"{r['op']:<15}{r['case']:<28}{r['impl']:<16}  {r['note']}", file=file)
            continue
        spread = f"[{r['us_p20']:.1f}, {r['us_p80']:.1f}]"
        speed = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
        pct = f"{r['pct_of_copy']:.0f}" if r.get("pct_of_copy") else "-"
        print(f"{r['op']:<15}{r['case']:<28}{r['impl']:<16}{r['us_p50']:>10.1f}{spread:>20}{speed:>9}"
              f"{r['gbps']:>9.1f}{pct:>7}", file=file)


def parse_args(description, argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (real timings) or cpu (smoke sizes, Triton interpreter)")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        args.quick = True  # the interpreter runs Python per block: realistic sizes would take minutes
    return args


def run_case(meta, op, case, impls, device, bytes_moved):
    """Time a list of (impl name, fn or None, check or None, skip reason or None); the first one is the
    eager baseline that the speedups divide. Returns the rows."""
    rows, baseline_us = [], None
    for name, fn, check, reason in impls:
        if fn is None:
            rows.append(skipped_row(meta, op, case, name, reason))
            continue
        row = run_impl(meta, op, case, name, fn, device, bytes_moved, baseline_us, check)
        if baseline_us is None and row.get("us_p50") is not None:
            baseline_us = row["us_p50"]
            row["speedup_vs_eager"] = 1.0
        rows.append(row)
    return rows
