"""End-to-end throughput: images/s of full training steps (PGD attack + weight perturbation + SGD update).

    python -m bench --device cuda --json out/e2e.json            # the issue's matrix (long)
    python -m bench --device cuda --plan device --time-budget 300  # prioritised subset, most important first
    python -m bench --smoke --json /tmp/e2e_smoke.json            # CPU, seconds; claims no figure

The parts, one module each: ``e2e_configs`` (variants, methods, plans, one row's config and step),
``e2e_timing`` (timed blocks, profiles, the matmul ceiling), ``e2e_flops`` (FLOP counts, the attack's
weight-gradient check), ``e2e_report`` (×released, ratios, targets, the table); this module runs a plan
(``Suite``) and holds the CLI. ``bench_dist.py`` is ``--nproc N``.

CPU smoke runs use one intra-op thread (robust on a shared machine) and claim nothing; they skip the
``compiled`` variant (Inductor's C++ compile: minutes) with a row that says so.

Each e2e row says how its step ran: ``mode`` ('captured', 'compiled' or 'eager', ``FastTrainStep.mode``
after the timing), ``mode_counts`` and ``timed_mode_counts`` ({mode: steps} of all its steps and of the timed
ones, ``FastTrainStep.mode_counts``), ``fallbacks`` (one line per phase that left fullgraph), ``fallback``
and ``fallback_reason`` when a step built to capture ran the compiled phases instead; ``first_step_s`` and
``first_captured_step_s`` (seconds to the end of the first step and of the first captured one: the compile
and capture cost); a captured row has ``replays_per_step``, ``replays_by_phase`` and
``expected_replays_per_step`` (1 + F + B + 1), an eager row ``ops_per_step``; on CUDA every row has
``host_ms_per_step``, ``gpu_ms_per_step``, ``gpu_busy_ms_per_step``, ``gpu_busy_fraction`` and
``cudagraph_skips`` (``e2e_timing``).

Output: a markdown table (variant, model, batch, method, regime, images/s, ×released, TFLOP/s, MFU),
``--json PATH`` (rewritten the moment each row is timed, before its profiles, and when it is complete, so a
timeout or a crash in a profiler keeps what was measured), and on a
real CUDA run the rows are appended to ``bench/results/e2e.jsonl`` with the GPU name, torch/triton/CUDA
versions, date, git commit, command and full config. ``--smoke`` never writes to bench/results.
"""

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import time
import warnings

import torch

from rwp_fast.bench import common
from rwp_fast.bench.e2e_configs import (FAST_FAMILY, METHODS, NOT_IMPLEMENTED, SMOKE_BATCH, SMOKE_MODEL,
                                        VARIANTS, build, build_plan, compiling_with_backend, expected_probes,
                                        make_batches, make_cfg, make_step, resolved_settings, skip_reason)
from rwp_fast.bench.e2e_flops import COUNT_BATCH, attack_check, compiled_check, count_step_flops
from rwp_fast.bench.e2e_report import jsonable, print_table, summary_rows
from rwp_fast.bench.e2e_timing import (cudagraph_skips, dynamo_reset, matmul_ceiling, profile_attack,
                                       profile_gpu_busy_ms, time_steps)
from rwp_fast.ops import dispatch
from rwp_fast.train.graphs import WARMUP_STEPS, count_aten_ops

RESULTS = os.path.join(common.REPO, "bench", "results", "e2e.jsonl")
SMOKE_LABEL = "smoke, not a measurement"


def _probes(result):
    info = result.search
    fractions = getattr(info, "mask_fractions", None) or []
    return len(fractions) if fractions else int(getattr(info, "steps_taken", 0) or 0)


class Suite:
    """Runs a plan of (model, batch, variant) units, each over the selected methods; collects rows."""

    def __init__(self, args, meta, device):
        self.args, self.meta, self.device = args, meta, torch.device(device)
        self.rows = []
        self.flops_cache = {}
        self.checks = {}
        self.t0 = time.perf_counter()

    # -- bookkeeping
    def elapsed(self):
        return time.perf_counter() - self.t0

    def out_of_time(self):
        return self.args.time_budget > 0 and self.elapsed() > self.args.time_budget

    def log(self, msg):
        print(f"[e2e {self.elapsed():6.0f}s] {msg}", file=sys.stderr, flush=True)

    def base_row(self, model, batch, variant, method_key, cfg=None):
        method, regime, _ = METHODS[method_key]
        row = {**self.meta, "kind": "e2e", "smoke": self.args.smoke, "variant": variant, "model": model,
               "batch": batch, "method": method, "regime": regime, "method_key": method_key,
               "images_per_s": None, "note": ""}
        if cfg is not None:
            row["config"] = cfg.to_dict()
        return row

    def append(self, row):
        """`row` is complete: labelled, kept and written."""
        if self.args.smoke and not row["note"].startswith(SMOKE_LABEL):
            row["note"] = "; ".join(filter(None, [SMOKE_LABEL, row["note"]]))
        self.save(row)

    def save(self, row):
        """Keep `row` (once) and rewrite the JSON now: called the moment a row is timed, before its profiles
        (a crash or a kill in them keeps the timing), and again by ``append`` when it is complete."""
        if not any(r is row for r in self.rows):
            self.rows.append(row)
        self.flush()

    def flush(self):
        if self.args.json:
            common.write_json(jsonable(self.rows), self.args.json)

    # -- FLOPs
    def flops_per_image(self, family, model_name, method_key):
        key = (family, model_name, method_key)
        if key not in self.flops_cache:
            try:
                self.flops_cache[key] = count_step_flops(family, model_name, method_key, self.device,
                                                         self.args.smoke)
            except Exception as exc:  # noqa: BLE001  a row without FLOPs is still a timing
                self.log(f"FLOP count {key} failed: {type(exc).__name__}: {exc}")
                self.flops_cache[key] = None
        return self.flops_cache[key]

    def check_for(self, model_name, inspect_compiled):
        check = self.checks.get(model_name)
        try:
            if check is None:
                check = self.checks[model_name] = attack_check(model_name, self.device, inspect_compiled)
            elif inspect_compiled and "error" not in check and "compiled_frozen" not in check \
                    and "compiled_error" not in check:
                model = build(model_name, self.device).train()
                (x, y), = make_batches(COUNT_BATCH, self.device, n_batches=1, seed=2)
                check.update(compiled_check(model, x, y))
        except Exception as exc:  # noqa: BLE001
            check = self.checks[model_name] = {"model": model_name, "error": f"{type(exc).__name__}: {exc}"}
        return check

    def add_flops(self, row, variant, model_name, method_key, cfg):
        useful = self.flops_per_image("fast", model_name, method_key)
        family = variant if variant in ("released", "reference") else "fast"
        own = self.flops_per_image(family, model_name, method_key) if family != "fast" else useful
        if variant == "no-input-only" and own is not None:
            wgrad = self.check_for(model_name, inspect_compiled=False).get("wgrad_flops_per_image")
            own = None if wgrad is None else own + cfg.attack_steps * wgrad
        batch = row["batch"]
        row["flops_per_step_useful"] = None if useful is None else useful * batch
        row["flops_per_step_own"] = None if own is None else own * batch
        ips, ceiling = row["images_per_s"], self.meta.get("ceiling_tflops")
        for name, per_image in (("", useful), ("_own", own)):
            tflops = None if per_image is None or not ips else per_image * ips / 1e12
            row["tflops" + name] = tflops
            row["mfu" + name] = tflops / ceiling if tflops is not None and ceiling else None

    # -- one unit: a model instance of one variant, measured over the methods
    def run_unit(self, model_name, batch, variant, batches):
        args, device = self.args, self.device
        methods = [m for m in METHODS if m in args.methods]
        skip = skip_reason(variant, device, args.smoke)
        if skip:
            for m in methods:
                row = self.base_row(model_name, batch, variant, m)
                row["note"] = skip
                self.append(row)
            return
        model = None
        for method_key in methods:
            cfg = make_cfg(model_name, batch, method_key, variant, device, args.smoke)
            row = self.base_row(model_name, batch, variant, method_key, cfg)
            if self.out_of_time():
                row["note"] = f"skipped: time budget ({args.time_budget:.0f}s) spent"
                self.append(row)
                continue
            try:
                if model is None:
                    dynamo_reset()  # fresh dynamo caches per model instance (recompile limit)
                    model = build(model_name, device)
                    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    model.load_state_dict(initial)  # every method starts from the same weights
                with warnings.catch_warnings(record=True) as caught:  # a failed capture's RuntimeWarning
                    warnings.simplefilter("always")
                    step, optimizer = make_step(variant, model, cfg, device)
                    settings = resolved_settings(variant, cfg, device)
                    started = getattr(step, "mode", "eager")  # FastTrainStep decides it at construction
                    skips_before = cudagraph_skips()
                    # eager variants need one warm-up step; compiled ones compile in the first; a captured step
                    # runs WARMUP_STEPS uncaptured and captures at the next, all before the timed blocks
                    warmup = args.warmup if settings["compile"] else min(args.warmup, 1)
                    if started == "captured":
                        warmup = max(warmup, WARMUP_STEPS + 1)
                    timing = time_steps(step, model, optimizer, cfg, batches, device, warmup, args.steps,
                                        args.repeats)
                for text, n in collections.Counter(f"{w.category.__name__}: {w.message}" for w in caught).items():
                    self.log(f"{variant} {method_key}: {text}" + (f" (x{n})" if n > 1 else ""))
                ips = [args.steps * batch / s for s in timing["seconds"]]
                row["images_per_s"] = statistics.median(ips)
                row["images_per_s_repeats"] = [round(v, 2) for v in ips]
                row["step_ms"] = 1e3 * batch / row["images_per_s"]
                row["warmup_s"] = round(timing["warmup_s"], 3)
                # compile time as a figure: to the end of the first step, and of the first captured one
                for key in ("first_step_s", "first_captured_step_s"):
                    row[key] = None if timing[key] is None else round(timing[key], 3)
                # the mode each step ran in (FastTrainStep.mode_counts), and any fullgraph fallback
                row["mode_counts"], row["timed_mode_counts"] = timing["mode_counts"], timing["timed_mode_counts"]
                row["fallbacks"] = list(getattr(step, "fallbacks", None) or [])
                row["recompiles"] = timing["recompiles"]
                row["host_ms_per_step"], row["gpu_ms_per_step"] = timing["host_ms"], timing["gpu_ms"]
                row["steps"], row["repeats"], row["warmup"] = args.steps, args.repeats, warmup
                row["probes"] = _probes(timing["result"])
                row["expected_probes"] = expected_probes(cfg, variant)
                row["settings"] = settings
                row["mode"] = getattr(step, "mode", "eager")  # as it ran: a failed capture leaves 'compiled'
                notes = []
                if started != settings["mode"]:
                    notes.append(f"started in mode {started}, the bench expected {settings['mode']}")
                if started == "captured" and row["mode"] != "captured":  # the capture raised
                    row["fallback"] = row["mode"]
                    reason = next((str(w.message) for w in caught if "capture failed" in str(w.message)), "")
                    row["fallback_reason"] = reason
                    notes.append(f"capture failed, fell back to mode {row['mode']}"
                                 + (f" ({reason[:200]})" if reason else ""))
                if row["mode"] == "captured":
                    replays = timing["replays"]
                    row["replays_by_phase"] = replays
                    row["replays_per_step"] = None if replays is None else sum(replays.values())
                    search = timing["result"].search
                    row["expected_replays_per_step"] = 2 + len(search.mask_fractions) + int(search.steps_taken)
                    if replays is None:
                        notes.append("the phases were not captured before the timed steps")
                    elif row["replays_per_step"] != row["expected_replays_per_step"]:
                        notes.append(f"replays/step {row['replays_per_step']:g} != expected "
                                     f"{row['expected_replays_per_step']} (1 + F + B + 1)")
                if row["probes"] != row["expected_probes"]:
                    notes.append(f"probes {row['probes']} != expected {row['expected_probes']}")
                if timing["recompiles"]:
                    notes.append(f"{timing['recompiles']} graph(s) compiled during timing")
                timed = timing["timed_mode_counts"] or {}
                if len(timed) > 1 or (timed and row["mode"] not in timed):
                    notes.append("timed steps ran in modes " + ", ".join(f"{m} {n}" for m, n in timed.items()))
                if row["fallbacks"]:
                    notes.append("fullgraph fallback: " + " | ".join(row["fallbacks"]))
                fast_cfg = make_cfg(model_name, batch, method_key, "fast", device, args.smoke)
                if variant in FAST_FAMILY and variant != "fast" \
                        and row["settings"] == resolved_settings("fast", fast_cfg, device):
                    notes.append("same settings as fast on this device")
                row["note"] = "; ".join(notes)
                self.save(row)  # the timing is on disk before any profiler runs
                if device.type == "cuda" and variant in FAST_FAMILY and method_key == methods[0]:
                    try:
                        row.update(profile_attack(step, *batches[0], torch.Generator(device=device)
                                                  .manual_seed(0), device))
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"attack profile failed: {type(exc).__name__}")
                if device.type == "cuda":
                    gen = torch.Generator(device=device).manual_seed(1)
                    try:
                        one_step = functools.partial(step, model, optimizer, *batches[0], cfg, True, gen)
                        busy = profile_gpu_busy_ms(one_step, device)
                        row["gpu_busy_ms_per_step"] = round(busy, 3)
                        row["gpu_busy_fraction"] = round(busy / row["step_ms"], 4)
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"GPU-busy profile failed: {type(exc).__name__}")
                    if skips_before is not None:
                        row["cudagraph_skips"] = cudagraph_skips() - skips_before
                if not row["settings"]["compile"] and row["mode"] != "captured":
                    # launch proxy: a dispatch mode sees eager ops only (not compiled code, not a graph replay)
                    row["ops_per_step"] = count_aten_ops(step, model, optimizer, *batches[0], cfg, True,
                                                         torch.Generator(device=device).manual_seed(0))[1].total
                row["note"] = "; ".join(notes)
                self.add_flops(row, variant, model_name, method_key, cfg)
                self.log(f"{model_name} b{batch} {variant:<16} {method_key:<13} "
                         f"{row['images_per_s']:9.1f} img/s  mode {row['mode']}  (warm-up {row['warmup_s']:.1f}s, "
                         f"first step {row['first_step_s']:.1f}s)")
                del step, optimizer
            except Exception as exc:  # noqa: BLE001  one broken configuration does not stop the suite
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                if row.get("images_per_s") is None:
                    row["note"] = f"error: {error}"
                else:  # saved already: the figure stands, what failed after it is said
                    row["note"] = "; ".join(filter(None, [row["note"], f"error after the timing: {error}"]))
                self.log(f"{model_name} b{batch} {variant} {method_key}: {row['note']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            self.append(row)
        del model
        dispatch.set_backend(None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the whole plan
    def run(self, units):
        with compiling_with_backend() as backend:
            if backend is not None:
                self.log(f"torch.compile backend {backend} (RWP_FAST_COMPILE_BACKEND)")
            return self._run(units)

    def _run(self, units):
        data = {}
        models = []
        for model_name, _, _ in units:
            if model_name not in models:
                models.append(model_name)
        for model_name, batch, variant in units:
            if batch not in data and variant not in NOT_IMPLEMENTED:
                data[batch] = make_batches(batch, self.device)
            self.run_unit(model_name, batch, variant, data.get(batch))
        # after the timings, which have priority under a time budget
        if models and "check" not in self.args.skip:
            if self.out_of_time():
                self.checks.setdefault(models[0], {"model": models[0]})["error"] = \
                    f"skipped: time budget ({self.args.time_budget:.0f}s) spent"
            else:
                self.log(f"attack weight-grad check on {models[0]}")
                self.check_for(models[0], inspect_compiled=True)
        self.rows += summary_rows(self.rows, self.checks, self.meta, self.args.smoke)
        self.flush()
        return self.rows


# --------------------------------------------------------------------------------------------- CLI
def _csv(kind, choices=None):
    def parse(text):
        items = [kind(t) for t in text.split(",") if t.strip()]
        if choices is not None:
            bad = [i for i in items if i not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {', '.join(map(str, choices))}")
        return items
    return parse


def parse_args(argv=None):
    from rwp_fast.config import MODELS
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run ({SMOKE_MODEL} b{SMOKE_BATCH}, K1=2, K2=3, 1 step): checks that every "
                        "variant runs (on CPU 'compiled' is a skipped row unless RWP_FAST_COMPILE_BACKEND "
                        "names a backend); claims no figure and never writes "
                        "bench/results")
    p.add_argument("--plan", default="issue", choices=("issue", "device"),
                   help="issue: PreAct-18 b128/b512 and WRN-34-10 b128, every variant; device: the "
                        "prioritised subset, most important first (e2e_configs.DEVICE_PLAN). "
                        "--models/--batch-sizes: their product")
    p.add_argument("--models", type=_csv(str, MODELS), default=None,
                   help="comma-separated, e.g. preact_resnet18,wrn-34-10")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="comma-separated, e.g. 128,512")
    p.add_argument("--variants", type=_csv(str, VARIANTS), default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--methods", type=_csv(str, tuple(METHODS)), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 5; smoke 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats; the median is reported (default 3; smoke 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, compilation included (default 2; smoke 1); a captured step takes "
                        f"at least {WARMUP_STEPS + 1} (its uncaptured warm-up and the capture)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; configurations not started by then become 'skipped' rows (0 = no limit)")
    p.add_argument("--skip", type=_csv(str, ("check",)), default=[],
                   help="'check': skip the attack weight-grad check")
    p.add_argument("--json", default=None, help="write all rows to this JSON file (rewritten as rows arrive)")
    p.add_argument("--no-results", action="store_true", help="do not append to bench/results/e2e.jsonl")
    p.add_argument("--table-from", default=None, help="only print the table of an existing --json file")
    p.add_argument("--nproc", type=int, default=1,
                   help="N > 1: the fast step on N processes (torchrun, global batch split) vs 1 process, "
                        "AT and AT-RWP; bench/bench_dist.py (multi-GPU speed is unmeasured so far)")
    args = p.parse_args(argv)
    defaults = (1, 2, 1) if args.smoke else (5, 3, 2)
    for name, value in zip(("steps", "repeats", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --smoke)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.nproc > 1:
        from rwp_fast.bench.bench_dist import run as run_dist
        return run_dist(args)
    if args.table_from:
        with open(args.table_from) as f:
            print_table(json.load(f))
        return []
    device = torch.device(args.device)
    if args.smoke and device.type == "cpu":
        # One intra-op thread: the smoke figures mean nothing anyway, and on a shared 2-core machine a busy
        # neighbour makes two spinning OpenMP threads 2x slower than one (28 s vs 14 s for the suite).
        torch.set_num_threads(1)
    meta = common.run_metadata(device)
    meta["command"] = "python -m bench " + " ".join(argv)
    meta["device_type"] = device.type
    meta["ceiling_tflops"], meta["ceiling_op"] = matmul_ceiling(device)
    units = build_plan(args)
    suite = Suite(args, meta, device)
    rows = suite.run(units)
    print_table(rows)
    if device.type == "cuda" and not args.smoke and not args.no_results:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "a") as f:
            for r in rows:
                f.write(json.dumps(jsonable(r)) + "\n")
    return rows


if __name__ == "__main__":
    main()
