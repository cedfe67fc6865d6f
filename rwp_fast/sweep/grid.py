"""The points of a sweep: ``--grid``/``--lsc-ranges``/``--seeds`` parsed, expanded into RunConfigs and run
directory names, and ``sweep.json`` (the list of points) written and read back."""

import dataclasses
import itertools
import json
import math
import os

from .._fs import atomic_write
from ..config import FLAGS, RENAMED_FIELDS, ConfigError, RunConfig
from ..readers import SWEEP_FILE, read_sweep_file
LSC_KEY = "lsc_range"                 # the pseudo-field of --lsc-ranges: (lsc_low, c_min)
# Not part of a run's identity: a finished run with other values here is still the same run. compile_mode
# is a speed setting whose modes the tests hold equal to the reference.
NOT_IDENTITY = ("out_dir", "quiet", "device", "compile_mode")
# The LSC-range analysis of `rwp-fast demo --lsc-analysis`: the paper's ranges (SPEC.md, Fig. 1), in nats.
DEMO_LSC_RANGES = "0:0.5,0.5:1,1:1.5,1.5:2,2:inf"


# ------------------------------------------------------------------------------------------ parsing
def _fields():
    return {f.name: f.default for f in dataclasses.fields(RunConfig)}


def parse_value(name, text):
    """`text` as a value of RunConfig field `name` (typed by the field's default)."""
    default = _fields()[name]
    text = text.strip()
    try:
        if isinstance(default, bool) or name in ("compile", "channels_last"):
            if text.lower() in ("none", "auto") and default is None:
                return None
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split("/") if v != "")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        kind = {bool: "true or false", tuple: "integers joined by '/' (e.g. 100/150)", int: "an integer",
                float: "a number"}.get(type(default) if default is not None else bool, "a value")
        raise ConfigError(f"grid: {name}={text!r} is not {kind}") from None


def parse_grid(spec):
    """'field=v1,v2' -> (field, [values]); a ConfigError naming --grid and the allowed fields."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    name = RENAMED_FIELDS.get(name, name)   # --grid epsilon=... as the flag --epsilon: sets epsilon_255
    fields = [n for n in _fields() if n not in NOT_IDENTITY]
    if not sep or not values.strip():
        raise ConfigError(f"grid: {spec!r} is not FIELD=V1,V2,...; e.g. --grid c_min=1.0,1.5,1.7")
    if name not in fields:
        raise ConfigError(f"grid: {name!r} is not a RunConfig field; allowed: {', '.join(fields)}")
    parsed = [parse_value(name, v) for v in values.split(",") if v.strip()]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"grid: {name} lists a value twice ({values})")
    return name, parsed


def parse_lsc_ranges(text):
    """'0:0.5,2:inf' -> [(0.0, 0.5), (2.0, inf)]; each p <= q, p finite."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        p, sep, q = part.partition(":")
        try:
            p, q = float(p), float(q)
        except ValueError:
            p = q = None
        if not sep or p is None or math.isnan(p) or math.isnan(q) or not math.isfinite(p) or p < 0 or q < p:
            raise ConfigError(f"lsc_ranges: {part!r} is not P:Q with 0 <= P <= Q (Q may be inf), in nats; "
                              f"e.g. {DEMO_LSC_RANGES}")
        out.append((p, q))
    if not out:
        raise ConfigError(f"lsc_ranges: no range in {text!r}; e.g. {DEMO_LSC_RANGES}")
    return out


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {text!r} is not a comma-separated list of distinct integers >= 0, e.g. 0,1,2")
    return seeds


# ------------------------------------------------------------------------------------------ points
def format_value(value):
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]!r}-{value[1]!r}"      # an LSC range
    if isinstance(value, tuple):
        return "/".join(map(str, value)) or "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def value_label(key, value):
    """Human form of one swept value: 'c_min=1.5', 'LSC [0.5, 1.0)'; a field is named by its flag
    (epsilon=8.0 for epsilon_255), as in the run directory names."""
    if key == LSC_KEY:
        return f"[{value[0]:g}, {'∞' if value[1] == math.inf else f'{value[1]:g}'})"
    return f"{FLAGS.get(key, key)}={format_value(value)}"


def run_name(values, seed=None):
    # Named by the flag (epsilon=8.0 for epsilon_255): the directory names of sweeps from before the rename.
    parts = [("lsc" if k == LSC_KEY else FLAGS.get(k, k)) + "=" + format_value(v) for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    name = "_".join(parts) or "base"
    return name.replace(os.sep, "-").replace(" ", "")


def expand_points(grids, zip_=False, lsc_ranges=None):
    """[{key: value}] in sweep order: the LSC ranges (if any) outermost, then the grids."""
    keys = [name for name, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"grid: a field is given twice ({', '.join(keys)})")
    if lsc_ranges and {"lsc_low", "c_min"} & set(keys):
        raise ConfigError("grid: --lsc-ranges sets lsc_low and c_min; do not also --grid them")
    if zip_ and grids:
        lengths = {name: len(values) for name, values in grids}
        if len(set(lengths.values())) != 1:
            raise ConfigError("zip: --zip pairs the grids element by element and needs equal lengths, got "
                              + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        combos = [tuple(values[i] for _, values in grids) for i in range(len(grids[0][1]))]
    else:
        combos = list(itertools.product(*[values for _, values in grids]))
    points = []
    for lsc in (lsc_ranges or [None]):
        for combo in combos:
            point = {LSC_KEY: lsc} if lsc is not None else {}
            point.update(zip(keys, combo))
            points.append(point)
    return points


def point_config(base, values, seed, sweep_dir, with_seed):
    changes = {k: v for k, v in values.items() if k != LSC_KEY}
    if LSC_KEY in values:
        changes["lsc_low"], changes["c_min"] = values[LSC_KEY]
    if seed is not None:
        changes["seed"] = seed
    name = run_name(values, seed if with_seed else None)
    cfg = base.replace(**changes, out_dir=os.path.join(sweep_dir, name))
    try:
        return name, cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (sweep point {name})") from None


@dataclasses.dataclass
class Sweep:
    directory: str
    keys: list            # swept keys, in order (LSC_KEY first when given)
    points: list          # [{"values": {key: value}, "label": str, "runs": [{"seed": s, "dir": name}]}]
    configs: dict         # run dir name -> RunConfig (only when built from arguments)

    def runs(self):
        return [(p, r) for p in self.points for r in p["runs"]]


def build_sweep(base, sweep_dir, grids=(), zip_=False, seeds=None, lsc_ranges=None):
    if lsc_ranges and base.perturb != "rwp":
        raise ConfigError(f"lsc_ranges: the LSC range shapes the RWP perturbation; the base config has "
                          f"perturb {base.perturb!r} (allowed with --lsc-ranges: rwp; e.g. --perturb rwp or "
                          "a *-rwp preset)")
    values = expand_points(list(grids), zip_, lsc_ranges)
    keys = list(values[0])
    points, configs, labels = [], {}, {}
    for v in values:
        runs = []
        for seed in (seeds or [None]):
            name, cfg = point_config(base, v, seed, sweep_dir, with_seed=seeds is not None)
            # two points, one directory: one would never run and its row would repeat the other's result
            # (run names drop spaces and path separators; a case-insensitive file system folds case too)
            same = labels.get(name.casefold())
            if same is not None:
                raise ConfigError(f"grid: the points {same[1]} and {_describe(v, seed)} both map to the run "
                                  f"directory {same[0]!r}; allowed: values that differ after dropping spaces and "
                                  f"'{os.sep}' and ignoring case")
            labels[name.casefold()] = (name, _describe(v, seed))
            runs.append({"seed": cfg.seed, "dir": name})
            configs[name] = cfg
        label = ", ".join(value_label(k, x) for k, x in v.items()) or "base"
        points.append({"values": v, "label": label, "runs": runs})
    return Sweep(sweep_dir, keys, points, configs)


def _describe(values, seed):
    text = ", ".join(f"{'lsc' if k == LSC_KEY else FLAGS.get(k, k)}={v!r}" for k, v in values.items())
    return f"({text}{f', seed={seed}' if seed is not None else ''})"


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def save_sweep_file(sweep):
    data = {"keys": sweep.keys,
            "points": [{"values": {k: _json_value(v) for k, v in p["values"].items()}, "label": p["label"],
                        "runs": p["runs"]} for p in sweep.points]}
    # inf is written as Infinity, which json.load reads back
    atomic_write(os.path.join(sweep.directory, SWEEP_FILE), lambda f: json.dump(data, f, indent=1), mode="w")


def load_sweep_file(sweep_dir):
    """The Sweep of SWEEP_DIR/sweep.json, read by its shape-checking reader (rwp_fast/readers.py)."""
    data = read_sweep_file(sweep_dir)
    for p in data["points"]:
        p["values"] = {k: tuple(v) if isinstance(v, list) else v for k, v in p["values"].items()}
    return Sweep(sweep_dir, data["keys"], data["points"], {})
