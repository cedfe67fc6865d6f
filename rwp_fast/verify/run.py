"""``rwp-fast verify``: are the fused kernels right on this machine? Every fused op × available backend ×
dtype against the plain-PyTorch reference, then optionally K whole training steps (``--steps K``).

Prints a table (op, function, backend, dtype, shape family, worst abs / rel / ulp error, tolerance,
PASS/FAIL), writes ``--json FILE`` with the device, driver, versions and commit, and exits 1 on any FAIL.
A backend that is missing is listed as skipped with the reason; it fails the run only under ``--require``.
"""

import argparse
import math
import os
import platform
import subprocess
import sys
import time

from .._env import csv_list as _csv

OPS = ("pgd_step", "lsc_loss", "weight_perturb")
BACKENDS = ("cuda", "triton")
DTYPES = ("fp32", "bf16", "fp16")


def _torch_dtype(name):
    return _dtypes()[name]


def _dtypes():
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}




def add_arguments(p):
    from ..config import MODELS
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="default: cuda when available, else cpu (Triton interpreter)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, no prime > 2^20, fp32 only on CPU (under 20 s on an H100)")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="also check the segment table of this model's perturbed weights "
                        "(default on CUDA: preact_resnet18; on CPU none)")
    p.add_argument("--ops", type=_csv(OPS), default=list(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS), help="subset of cuda,triton")
    p.add_argument("--dtypes", type=_csv(DTYPES), default=None, help="subset of fp32,bf16,fp16 (default all)")
    p.add_argument("--families", default=None,
                   help="only shape families whose name contains one of these comma-separated words "
                        "(random, odd, special, NaN, eps, mask, model)")
    p.add_argument("--require", type=_csv(BACKENDS), default=[],
                   help="backends whose absence is a FAIL, e.g. cuda,triton")
    p.add_argument("--steps", type=int, default=0, metavar="K",
                   help="also run K fast vs reference training steps for AT, AT-AWP, AT-RWP: the verdict in float64 "
                        "(TF32 off), with the fp32 (and on CUDA bf16) drift from fp64 reported beside it")
    p.add_argument("--steps-model", default=None, choices=MODELS,
                   help="model of the --steps check (default: preact_resnet18 on CUDA, small_cnn on CPU)")
    p.add_argument("--strict", action="store_true", help="count KNOWN deviations as FAIL")
    p.add_argument("--json", default=None, metavar="FILE", help="write every result and the run metadata here")
    p.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------------------------------ environment
def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def metadata(device):
    import torch
    from .. import __version__ as version
    from .._env import git_commit, triton_version
    dev = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": dev.type,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None,
        "driver": _driver() if dev.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
        "python": platform.python_version(), "rwp_fast": version, "commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "rwp-fast verify " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["verify"] else " ".join(sys.argv),
    }


def backend_status(name, device):
    """None if backend `name` can run every op on `device`, else why not."""
    import torch
    if name == "cuda":
        if torch.device(device).type != "cuda":
            return "no CUDA device here (the CUDA extension runs CUDA tensors only)"
        try:
            import rwp_fast.ops.cuda_ops  # noqa: F401
        except ImportError as exc:
            return f"rwp_fast._C not built or not loadable ({exc}); reinstall with nvcc present"
    from ..ops import dispatch
    for op in OPS:
        try:
            dispatch.choose_backend(op, torch.device(device), name)
        except (ImportError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------------ running
def _shape_text(shape):
    return "x".join(map(str, shape)) if isinstance(shape, tuple) else str(shape)


def run_op_checks(op, ctx, known, strict):
    """Compare every output the op's checks yield; aggregate per (function, family). Returns rows."""
    from . import checks
    from . import tolerances as T
    groups = {}
    t0 = time.perf_counter()
    try:
        for function, family, shape, output, got, ref, tol in checks.CHECKS[op](ctx):
            res = T.compare(got, ref, tol, dtype=ctx.dtype if got.is_floating_point() and got.dtype == ctx.dtype
                            else got.dtype)
            key = (function, family)
            g = groups.setdefault(key, {"shapes": [], "outputs": {}})
            if _shape_text(shape) not in g["shapes"]:
                g["shapes"].append(_shape_text(shape))
            prev = g["outputs"].get(output)
            entry = dict(res, tolerance=tol.describe(), why=tol.why, shape=_shape_text(shape))
            if prev is None or (prev["ok"] and (not res["ok"] or _worse(res, prev))):
                g["outputs"][output] = entry
    except Exception as exc:  # noqa: BLE001  a crash of a backend is a FAIL of that op, not of verify
        groups[("(crashed)", "-")] = {"shapes": [], "outputs": {"-": dict(
            ok=False, worst_abs=None, worst_rel=None, worst_ulp=None, tolerance="-", why="-", shape="-",
            reason=f"{type(exc).__name__}: {str(exc)[:300]}")}}
    if not groups:  # e.g. a --families filter that matches nothing: never a silent PASS
        groups[("(no checks)", "-")] = {"shapes": [], "outputs": {"-": dict(
            ok=False, worst_abs=None, worst_rel=None, worst_ulp=None, tolerance="-", why="-", shape="-",
            reason="0 checks ran for this op, backend and dtype (check --families)")}}
    rows = []
    names = {v: k for k, v in _dtypes().items()}
    for (function, family), g in groups.items():
        failing = {o: e for o, e in g["outputs"].items() if not e["ok"]}
        worst_out = next(iter(failing), None) or max(g["outputs"], key=lambda o: g["outputs"][o]["worst_ulp"] or 0)
        w = g["outputs"][worst_out]
        status = "PASS"
        notes = [f"{o}: {e['reason']}" for o, e in failing.items()]
        known_here = {o: known[(op, function, family, o)] for o in g["outputs"] if (op, function, family, o) in known}
        if failing:
            unexplained = [o for o in failing if o not in known_here]
            status = "FAIL" if unexplained or strict else "KNOWN"
            if status == "KNOWN":
                notes = [f"known: {o}: {known_here[o]}" for o in failing]
        elif known_here:
            notes.append("KNOWN entry no longer needed: " + ", ".join(known_here))
        rows.append(dict(op=op, function=function, backend=ctx.backend, dtype=names[ctx.dtype],
                         family=family, shapes=g["shapes"], output=worst_out, worst_abs=w["worst_abs"],
                         worst_rel=w["worst_rel"], worst_ulp=w["worst_ulp"], tolerance=w["tolerance"],
                         why=w["why"], status=status, note="; ".join(notes),
                         outputs={o: {k: v for k, v in e.items() if k != "why"} for o, e in g["outputs"].items()}))
    if rows:
        rows[0]["seconds"] = round(time.perf_counter() - t0, 2)
    return rows


def _worse(a, b):
    return (a["worst_ulp"] or 0) > (b["worst_ulp"] or 0)


def model_numels(name):
    from ..models import build_model
    from ..core import perturbed_parameters
    # on the CPU, not "meta": Normalize checks its std with a host read (WRN-34-10: 185 MB, about a second)
    model = build_model(name, 10, 3, (0.5,) * 3, (0.25,) * 3)
    return [p.numel() for _, p in perturbed_parameters(model)]


def verify(args, log=print, progress=None):
    """Run everything; returns (report dict, exit status). ``progress(report)``: called with the report so far
    after every op × backend × dtype and after the step checks (``main`` rewrites ``--json`` with it, so a run
    cut short keeps every result it made; such a report has ``partial`` True)."""
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    if device == "cpu":
        # Triton kernels run on CPU tensors only under the interpreter; it must be set before the kernel
        # modules are imported (@triton.jit reads it), which this command does lazily, after this line.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import checks
    from . import tolerances as T
    cpu = device == "cpu"
    dtypes = args.dtypes or (["fp32"] if (cpu and args.quick) else list(DTYPES))
    model = args.model or (None if cpu else "preact_resnet18")
    big = not args.quick and not cpu or (not args.quick and cpu and os.environ.get("RWP_VERIFY_BIG") == "1")
    skipped, rows = [], []
    if args.quick or cpu:
        if not big:
            skipped.append(dict(what=f"odd size {checks.PRIME} (prime > 2^20)",
                                reason="--quick" if args.quick else "CPU: the Triton interpreter needs ~10 s per "
                                "dtype for it (RWP_VERIFY_BIG=1 runs it)"))
        if cpu and args.quick and args.dtypes is None:
            skipped.append(dict(what="bf16, fp16", reason="--quick on CPU checks fp32 only (--dtypes to add)"))
    if cpu and "bf16" in dtypes:
        # measured: 1-ulp differences on about half of all bf16 outputs, in every op, while fp16 passes; the
        # interpreter (numpy has no bf16) rounds fp32 → bf16 otherwise than torch. On a GPU bf16 is checked.
        dtypes = [d for d in dtypes if d != "bf16"]
        skipped.append(dict(what="bf16 on CPU", reason="the Triton interpreter rounds fp32 → bf16 otherwise than "
                                                      "torch (1-ulp differences everywhere); checked on a GPU"))
    if model is None:
        skipped.append(dict(what="model segment table", reason="no --model given (CPU default)"))
    numels = model_numels(model) if model else None
    meta = metadata(device)
    available = []
    for name in args.backends:
        reason = backend_status(name, device)
        if reason:
            failed = name in args.require
            skipped.append(dict(what=f"backend {name}", reason=reason, required=failed))
            if failed:
                rows.append(dict(op="-", function="-", backend=name, dtype="-", family="-", shapes=[], output="-",
                                 worst_abs=None, worst_rel=None, worst_ulp=None, tolerance="-", why="--require",
                                 status="FAIL", note=f"required backend missing: {reason}", outputs={}))
            continue
        available.append(name)
    t0 = time.perf_counter()

    def report_now(step_rows, partial):
        fails = sum(r["status"] == "FAIL" for r in rows + step_rows)
        return dict(meta=meta, verdict="FAIL" if fails else ("INCOMPLETE" if partial else "PASS"), partial=partial,
                    fails=fails, known=sum(r["status"] == "KNOWN" for r in rows), checks=len(rows),
                    backends_checked=available, dtypes=dtypes, skipped=skipped, rows=rows, steps=step_rows,
                    seconds=round(time.perf_counter() - t0, 1))
    for name in available:
        for dt in dtypes:
            for op in args.ops:
                ctx = checks.Ctx(torch.device(device), name, _torch_dtype(dt), big=big, small=cpu or args.quick,
                                 model_numels=numels if op == "weight_perturb" else None, model_name=model,
                                 seed=args.seed)
                families = [f.strip() for f in args.families.split(",")] if args.families else None
                ctx.families = families
                new = run_op_checks(op, ctx, T.KNOWN, args.strict)
                rows += new
                bad = sum(r["status"] == "FAIL" for r in new)
                log(f"[verify {time.perf_counter() - t0:5.0f}s] {op:<15}{name:<7}{dt:<5} "
                    f"{len(new)} checks, {bad} FAIL", file=sys.stderr)
                if progress is not None:
                    progress(report_now([], partial=True))
    step_rows = []
    if args.steps > 0:
        steps_model = args.steps_model or ("small_cnn" if cpu else "preact_resnet18")
        from .steps import whole_step
        backend = available[0] if available else "torch"
        step_rows = whole_step(device, args.steps, steps_model, 16 if cpu else 32, backend,
                               log=lambda m: log(f"[verify {time.perf_counter() - t0:5.0f}s] {m}", file=sys.stderr),
                               progress=None if progress is None else
                               lambda done: progress(report_now(done, partial=True)))
    report = report_now(step_rows, partial=False)
    return report, (1 if report["fails"] else 0)


# ------------------------------------------------------------------------------------------ output
def _e(v):
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.1e}"


def print_report(report, file=None):
    file = file or sys.stdout
    m = report["meta"]
    print(f"device: {m['device']} ({m['device_type']}{', driver ' + m['driver'] if m['driver'] else ''}), "
          f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, commit {m['commit'] or 'unknown'}"
          + (", Triton interpreter" if m["triton_interpret"] and m["device_type"] == "cpu" else ""), file=file)
    head = (f"{'op':<15}{'function':<24}{'backend':<8}{'dtype':<9}{'family':<22}{'output':<17}{'abs err':>9}"
            f"{'rel err':>9}{'ulp':>9}  {'tolerance':<28}status")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in report["rows"]:
        print(f"{r['op']:<15}{r['function']:<24}{r['backend']:<8}{r['dtype']:<9}{r['family'][:21]:<22}"
              f"{r['output'][:16]:<17}{_e(r['worst_abs']):>9}{_e(r['worst_rel']):>9}{_e(r['worst_ulp']):>9}  "
              f"{r['tolerance'][:27]:<28}{r['status']}", file=file)
        if r["status"] != "PASS" or r["note"]:
            print(f"    {r['note']}", file=file)
    for s in report["steps"]:
        drift = ", ".join(f"{k.split('_')[0]} {v:.1e}" for k, v in s.items() if k.endswith("_weight_drift"))
        modes = "; ".join(f"{p} {', '.join(f'{m} {n}' for m, n in c.items())}"
                          for p, c in (s.get("mode_counts") or {}).items() if c)
        print(f"step {s['step']:>2} {s['method']:<7} {s['model']} b{s['batch']} (fp64, TF32 off): "
              f"weights rel {s['weight_rel_divergence']:.1e}, buffers {s['buffer_rel_divergence']:.1e}, probes "
              f"{s['probes']} (reference {s['reference_probes']}), tolerance {s['tolerance']}: {s['status']}; "
              f"measured drift from fp64 ({s['backend']} ops, not a gate): {drift}"
              + (f"; steps ran {modes}" if modes else "")
              + "".join(f"\n    fullgraph fallback: {f}" for f in s.get("fallbacks") or []), file=file)
    for s in report["skipped"]:
        print(f"skipped: {s['what']}: {s['reason']}" + ("  -> FAIL (--require)" if s.get("required") else ""),
              file=file)
    checked = ", ".join(report["backends_checked"]) or "no backend"
    print(f"verify: {report['verdict']} ({report['checks']} checks on {checked} × {', '.join(report['dtypes'])}: "
          f"{report['fails']} FAIL, {report['known']} KNOWN; "
          f"{len(report['steps'])} step checks; {report['seconds']} s)", file=file)
    if report["fails"]:
        print("A FAIL means a fused kernel gives results outside the stated tolerance of the reference on this "
              "machine: train with --backend torch until it is fixed, and send the --json file with the report.",
              file=file)


def write_json(report, path):
    import json

    from .._fs import atomic_write

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    # atomic: a run killed mid-write leaves the previous whole file; its temporary name fits NAME_MAX
    atomic_write(path, lambda f: json.dump(clean(report), f, indent=1), mode="w")


def main(args):
    """Entry of ``rwp-fast verify`` (args from add_arguments); returns the exit status."""
    if args.steps < 0:
        raise ValueError(f"--steps: expected K >= 0, got {args.steps}")
    if args.json:  # before minutes of checks, not after (rwp_fast/_fs.py: the one output-path check)
        from .._fs import check_output_file
        check_output_file(args.json, "json", "verify")
    report, status = verify(args, progress=(lambda partial: write_json(partial, args.json)) if args.json else None)
    print_report(report)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return status


def cli(argv=None):
    p = add_arguments(argparse.ArgumentParser(prog="rwp-fast verify", description=__doc__.splitlines()[0]))
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
