"""What the rows say: ×released, step-time ratios vs AT, the targets, the weight-grad check row, the table.

Targets (TARGET_SPEEDUP, TARGET_RATIO; reported "met"/"missed", never asserted): fast ≥ 8× released on
PreAct ResNet-18, batch 128, AT-RWP all probes; fast-path AT-RWP ÷ AT step time ≤ 2.3 (the all-probes regime,
the worst case; the break regime is listed too).

Output: a markdown table (variant, model, batch, method, regime, images/s, ×released, TFLOP/s, MFU, the mode
the step ran in and its steps by mode, seconds to the first step and to the first captured step (the compile
and capture cost), ops/step of eager rows, phase replays/step of captured rows, host/GPU/GPU-busy ms per step).
"""

import math
import sys

from rwp_fast.bench.e2e_configs import REGIME_HELP

TARGET_SPEEDUP = 8.0  # fast ÷ released, PreAct ResNet-18 b128 AT-RWP all probes (issue 24's target)
TARGET_RATIO = 2.3    # fast path AT-RWP ÷ AT step time (issue 24's target)


def jsonable(value):
    """`value` with inf/nan floats as strings: JSON has no literal for them (the all-probes rows' c_min = inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _index(rows):
    return {(r["model"], r["batch"], r["method_key"], r["variant"]): r for r in rows
            if r.get("kind") == "e2e" and r.get("images_per_s")}


def _status(ok, smoke, meta):
    """'met'/'missed' only for a real CUDA run: the targets are GPU targets."""
    if smoke:
        return "n/a (smoke)"
    if meta.get("device_type") != "cuda":
        return f"n/a ({meta.get('device_type')}: the targets are GPU targets)"
    return "met" if ok else "missed"


def summary_rows(rows, checks, meta, smoke):
    """Fill ×released into the e2e rows; return the ratio, target and check rows."""
    index = _index(rows)
    for r in rows:
        if r.get("kind") != "e2e" or not r.get("images_per_s"):
            continue
        base = index.get((r["model"], r["batch"], r["method_key"], "released"))
        r["speedup_vs_released"] = r["images_per_s"] / base["images_per_s"] if base else None
    out = []
    configs = sorted({(k[0], k[1], k[3]) for k in index})
    for model, batch, variant in configs:
        at = index.get((model, batch, "at", variant))
        for method_key in ("at-rwp-all", "at-rwp-break", "at-awp"):
            other = index.get((model, batch, method_key, variant))
            if at and other:
                ratio = at["images_per_s"] / other["images_per_s"]
                row = {**meta, "kind": "ratio", "smoke": smoke, "variant": variant, "model": model,
                       "batch": batch, "method_key": method_key, "time_ratio_vs_at": ratio}
                if variant == "fast" and method_key == "at-rwp-all":
                    row["target"] = f"<= {TARGET_RATIO}"
                    row["status"] = _status(ratio <= TARGET_RATIO, smoke, meta)
                out.append(row)
    key = ("preact_resnet18", 128, "at-rwp-all")
    fast, released = index.get(key + ("fast",)), index.get(key + ("released",))
    speedup = fast["images_per_s"] / released["images_per_s"] if fast and released else None
    out.append({**meta, "kind": "target", "smoke": smoke,
                "name": f"fast >= {TARGET_SPEEDUP:g}x released, preact_resnet18 b128 AT-RWP all probes",
                "value": speedup, "target": f">= {TARGET_SPEEDUP}",
                "status": "not measured" if speedup is None
                else _status(speedup >= TARGET_SPEEDUP, smoke, meta)})
    ratio_rows = [r for r in out if r.get("kind") == "ratio" and r.get("target")]
    primary = [r for r in ratio_rows if (r["model"], r["batch"]) == ("preact_resnet18", 128)]
    chosen = primary[0] if primary else (ratio_rows[0] if ratio_rows else None)
    out.append({**meta, "kind": "target", "smoke": smoke,
                "name": f"fast AT-RWP (all probes) / AT step time <= {TARGET_RATIO:g}"
                        + (f", {chosen['model']} b{chosen['batch']}" if chosen else ""),
                "value": chosen["time_ratio_vs_at"] if chosen else None, "target": f"<= {TARGET_RATIO}",
                "status": chosen["status"] if chosen else "not measured"})
    for model, check in checks.items():
        out.append(check_row(check, rows, meta, smoke))
    return out


def check_row(check, rows, meta, smoke):
    """The row 'attack weight-grad work: eager skips? compiled skips?' from attack_check + profiles."""
    row = {**meta, "kind": "check", "smoke": smoke, "name": "attack weight-grad work: eager skips? "
           "compiled skips?", **{k: v for k, v in check.items() if k != "eager_flops_by_op"}}
    if "error" in check:
        error = check["error"]
        row["answer"] = error if error.startswith("skipped") else f"check failed: {error}"
        return row
    e = check["eager_flops"]
    eager = (f"eager: frozen {e['frozen'] / 1e9:.3g} GFLOP, unfrozen autograd.grad "
             f"{e['unfrozen'] / 1e9:.3g}, released backward() {e['backward'] / 1e9:.3g} "
             f"(frozen/backward = {e['frozen'] / e['backward']:.3f}); "
             f"eager autograd.grad skips weight grads even unfrozen: {e['frozen'] == e['unfrozen']}")
    parts = [eager]
    if "compiled_frozen" in check:
        (nf, wf), (nu, wu) = check["compiled_frozen"], check["compiled_unfrozen"]
        parts.append(f"compiled backward graph: frozen {wf}/{nf} conv_backward compute weight grads, "
                     f"unfrozen {wu}/{nu}; compiled skips only when frozen: {wf == 0 and wu > 0}")
    elif "compiled_error" in check:
        parts.append(f"compiled graph inspection failed: {check['compiled_error']}")
    prof = {r["variant"]: r for r in rows if r.get("kind") == "e2e" and r.get("model") == check["model"]
            and "attack_wgrad_kernels" in r and r["variant"] in ("fast", "no-input-only")}
    if prof:
        parts.append("cuda inductor attack: " + ", ".join(
            f"{v} {r['attack_wgrad_kernels']} wgrad of {r['attack_kernels']} kernels, {r['attack_ms']} ms"
            f" (b{r['batch']})" for v, r in sorted(prof.items())))
    row["answer"] = "; ".join(parts)
    return row


def mode_counts_text(counts):
    """{'captured': 15, 'compiled': 3} -> 'captured 15, compiled 3'; '-' when unknown."""
    return ", ".join(f"{m} {n}" for m, n in counts.items()) if counts else "-"


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_table(rows, file=None):
    """The markdown table of the e2e rows, then the ratios, the targets and the check."""
    file = file or sys.stdout
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if e2e:
        r0 = e2e[0]
        print(f"device: {r0.get('device')}, torch {r0.get('torch')}, triton {r0.get('triton')}, "
              f"CUDA {r0.get('cuda')}, commit {r0.get('git_commit')}", file=file)
        print(f"ceiling: {_fmt(r0.get('ceiling_tflops'), '.1f')} TFLOP/s ({r0.get('ceiling_op')}); "
              f"regimes: {'; '.join(f'{k} = {v}' for k, v in REGIME_HELP.items())}", file=file)
    print("\n| variant | model | batch | method | regime | images/s | ×released | TFLOP/s | MFU | mode | steps by mode "
          "| first step s | first captured s | ops/step | replays/step | host/GPU/busy ms per step | note |", file=file)
    print("|---|---|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|", file=file)
    for r in e2e:
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        mode = (r.get("mode") or "-") + (" (fell back from captured)" if r.get("fallback") else "")
        print(f"| {r['variant']} | {r['model']} | {r['batch']} | {r['method']} | {r['regime']} | "
              f"{_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('speedup_vs_released'), '.2f')} | "
              f"{_fmt(r.get('tflops'), '.2f')} | {_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | {mode} | "
              f"{mode_counts_text(r.get('mode_counts'))} | {_fmt(r.get('first_step_s'), '.1f')} | "
              f"{_fmt(r.get('first_captured_step_s'), '.1f')} | {_fmt(r.get('ops_per_step'), 'd')} | "
              f"{_fmt(r.get('replays_per_step'), 'g')} | "
              f"{_fmt(r.get('host_ms_per_step'), '.2f')}/{_fmt(r.get('gpu_ms_per_step'), '.2f')}/"
              f"{_fmt(r.get('gpu_busy_ms_per_step'), '.2f')} | {r.get('note', '')} |", file=file)
    ratios = [r for r in rows if r.get("kind") == "ratio"]
    if ratios:
        print("\nstep time ÷ AT step time (same variant, model, batch):", file=file)
        for r in ratios:
            tail = f"  target {r['target']}: {r['status']}" if r.get("target") else ""
            print(f"  {r['variant']:<17}{r['model']} b{r['batch']} {r['method_key']:<13}"
                  f"{r['time_ratio_vs_at']:.2f}{tail}", file=file)
    for r in rows:
        if r.get("kind") == "target":
            print(f"target: {r['name']}: {_fmt(r.get('value'), '.2f')} (target {r['target']}): {r['status']}",
                  file=file)
    for r in rows:
        if r.get("kind") == "check":
            print(f"check [{r['model']}]: {r['name']}: {r.get('answer')}", file=file)

