"""One reader per kind of file that rwp-fast reads back, each checking the shape of what it reads.

    RUN/config.json        read_run_config    {"config": {RunConfig fields}, "git_commit": ..., ...}
    RUN/metrics.jsonl      read_metrics       one object per epoch: "epoch" >= 1, "test_robust_acc" in [0, 1]
                                              or null (not measured), the other numbers numbers or null
    SWEEP/sweep.json       read_sweep_file    {"keys": [...], "points": [{"values", "label", "runs"}]}
    RUN/done.json          read_done          {"epochs": N, ...}: a sweep's finished run
    RUN/point.json         read_point         a RunConfig dict: a ``sweep --parallel`` child's run
    *_eval.json            read_eval_report   {"results": {"n": N, attack: accuracy, ...}, ...}
    checkpoints (*.pt)     rwp_fast.train.checkpoint.load_checkpoint (needs torch; checks keys and config)
    datasets               rwp_fast.data: own.load_npz / load_folder, extra.load_extra (keys, dtypes, shapes)

Each raises FileShapeError (a ValueError, which the command line prints as one line with status 2) that
names the file and says what is wrong with it and what was expected; a missing required file is a
FileNotFoundError naming it. Nothing here writes.

``OUTPUT_KINDS`` (below) recognises the files that rwp-fast's commands write, so that the output-path
check (``rwp_fast._fs.check_output_file``) lets a command replace only a file of the kind it writes.
"""

import json
import math
import os

from .config import EVAL_ATTACKS as ATTACKS
from .config import ConfigError, RunConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SWEEP_FILE = "sweep.json"
DONE_FILE = "done.json"
POINT_FILE = "point.json"
CHECKPOINT_FILES = ("best.pt", "last.pt", "best_ema.pt")
# A run's and a sweep's own files: no output of any command may replace one (rwp_fast._fs.check_output_file).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, *CHECKPOINT_FILES, SWEEP_FILE, DONE_FILE, POINT_FILE)


class FileShapeError(ValueError):
    """A file that rwp-fast reads back has the wrong shape; the message names the file, says how, in one line."""


def _type_name(value):
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json(path, expected):
    """The parsed JSON of `path`; FileNotFoundError if it is missing, FileShapeError if it is no JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; expected {expected}") from None
    except IsADirectoryError:
        raise FileShapeError(f"{path}: is a directory; expected {expected}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileShapeError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]}); expected {expected}") \
            from None
    except OSError as exc:
        raise FileShapeError(f"{path}: cannot be read ({exc.strerror or exc}); expected {expected}") from None


def _object(data, path, expected):
    if not isinstance(data, dict):
        raise FileShapeError(f"{path}: holds {_type_name(data)}, not an object; expected {expected}")
    return data


# ------------------------------------------------------------------------------------------ config.json
CONFIG_SHAPE = "the object rwp-fast train writes, {\"config\": {...the run's fields...}, \"git_commit\": ...}"


def config_dict(d, path):
    """`d` as a RunConfig dict (old field names mapped), checked field by field; FileShapeError naming `path`."""
    try:
        return RunConfig.from_dict(d).to_dict()
    except ConfigError as exc:
        raise FileShapeError(f"{path}: {exc}") from None


def read_run_config(run_dir, required=False):
    """RUN/config.json as a dict whose 'config' is a checked RunConfig dict; None if it is missing and not
    `required`."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not required and not os.path.lexists(path):
        return None
    info = _object(read_json(path, CONFIG_SHAPE), path, CONFIG_SHAPE)
    if "config" not in info:
        raise FileShapeError(f"{path}: has no 'config' entry; expected {CONFIG_SHAPE}")
    return {**info, "config": config_dict(info["config"], path)}


# ------------------------------------------------------------------------------------------ metrics.jsonl
METRICS_SHAPE = "one JSON object per line with 'epoch' (>= 1) and 'test_robust_acc' (in [0, 1], or null: not measured)"
# number or null in a metrics row, where present; accuracies also within [0, 1]
ACCURACY_FIELDS = ("test_robust_acc", "test_natural_acc", "train_robust_acc", "train_natural_acc",
                   "test_robust_acc_ema", "test_natural_acc_ema", "best_test_robust_acc")
NUMBER_FIELDS = ("images_per_second", "rwp_steps_mean", "lr", "seconds", "train_robust_loss")


def _check_row(row, where):
    if not isinstance(row, dict):
        raise FileShapeError(f"{where} holds {_type_name(row)}, not an object; expected {METRICS_SHAPE}")
    for key in ("epoch", "test_robust_acc"):
        if key not in row:
            raise FileShapeError(f"{where} has no '{key}'; expected {METRICS_SHAPE}")
    if not (isinstance(row["epoch"], int) and not isinstance(row["epoch"], bool) and row["epoch"] >= 1):
        raise FileShapeError(f"{where}: epoch is {row['epoch']!r}; expected an integer >= 1")
    for key in ACCURACY_FIELDS + NUMBER_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        # a diverged run writes a NaN loss: a measurement, kept; an accuracy is never NaN (counts over examples)
        if not _is_number(value) or (key in ACCURACY_FIELDS and (math.isnan(value) or not 0 <= value <= 1)):
            allowed = "a number in [0, 1]" if key in ACCURACY_FIELDS else "a number"
            raise FileShapeError(f"{where}: {key} is {value!r}; expected {allowed} or null (not measured)")
    fractions = row.get("lsc_mask_fraction")
    if fractions is not None and not (isinstance(fractions, list) and all(_is_number(v) for v in fractions)):
        raise FileShapeError(f"{where}: lsc_mask_fraction is {fractions!r}; expected a list of numbers or null")


def read_metrics(run_dir):
    """The rows of RUN/metrics.jsonl, each checked; FileNotFoundError if the run has none. A null
    'test_robust_acc' is an epoch whose robust accuracy was not measured: readers skip it."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run_dir: {run_dir} has no metrics.jsonl; is it an rwp-fast run directory?")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise FileShapeError(f"{path}: cannot be read as text ({exc}); expected {METRICS_SHAPE}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise FileShapeError(f"{path}: line {number} is not valid JSON ({exc}); the file is corrupt") from None
        _check_row(row, f"{path}: line {number}")
        rows.append(row)
    return rows


def measured(rows, key="test_robust_acc"):
    """[(epoch, value)] of the rows where `key` was measured (not null, not absent)."""
    return [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]


# ------------------------------------------------------------------------------------------ sweep files
SWEEP_SHAPE = ("the object rwp-fast sweep writes, {\"keys\": [...], \"points\": [{\"values\": {...}, \"label\": "
               "..., \"runs\": [{\"seed\": ..., \"dir\": ...}]}]}")


def _plain_name(name):
    return isinstance(name, str) and name not in ("", ".", "..") and os.sep not in name and "/" not in name


def read_sweep_file(sweep_dir):
    """SWEEP/sweep.json, checked: every point has a value per key, a label and runs in plain directory
    names inside the sweep directory (a lists-to-tuples conversion is left to the caller)."""
    path = os.path.join(sweep_dir, SWEEP_FILE)
    data = _object(read_json(path, SWEEP_SHAPE), path, SWEEP_SHAPE)
    for key, kind in (("keys", list), ("points", list)):
        if not isinstance(data.get(key), kind):
            got = "missing" if key not in data else f"{_type_name(data[key])}"
            raise FileShapeError(f"{path}: '{key}' is {got}; expected {SWEEP_SHAPE}")
    keys = data["keys"]
    if not all(isinstance(k, str) for k in keys):
        raise FileShapeError(f"{path}: 'keys' must list field names (strings), got {keys!r}")
    for i, p in enumerate(data["points"]):
        where = f"{path}: point {i + 1}"
        if not (isinstance(p, dict) and isinstance(p.get("values"), dict) and isinstance(p.get("label"), str)
                and isinstance(p.get("runs"), list)):
            raise FileShapeError(f"{where} is not {{\"values\": {{...}}, \"label\": \"...\", \"runs\": [...]}}")
        if sorted(p["values"]) != sorted(keys):
            raise FileShapeError(f"{where} has values for {sorted(p['values'])}, but the keys are {keys}")
        for run in p["runs"]:
            if not (isinstance(run, dict) and _plain_name(run.get("dir"))
                    and (run.get("seed") is None or isinstance(run.get("seed"), int))):
                raise FileShapeError(f"{where}: run {run!r} is not {{\"seed\": integer or null, \"dir\": a directory "
                                     "name inside the sweep directory}")
    return data


def read_done(run_dir):
    """RUN/done.json (a sweep's mark of a finished run) as a dict with an integer 'epochs', or None."""
    path = os.path.join(run_dir, DONE_FILE)
    if not os.path.lexists(path):
        return None
    shape = "{\"epochs\": N, ...} as rwp-fast sweep writes it (delete it to run the point again)"
    data = _object(read_json(path, shape), path, shape)
    if not isinstance(data.get("epochs"), int) or isinstance(data.get("epochs"), bool):
        raise FileShapeError(f"{path}: 'epochs' is {data.get('epochs')!r}; expected {shape}")
    return data


def read_point(run_dir):
    """RUN/point.json: the RunConfig that a ``sweep --parallel`` child runs."""
    path = os.path.join(run_dir, POINT_FILE)
    data = read_json(path, "a RunConfig object as rwp-fast sweep writes it")
    return RunConfig.from_dict(config_dict(data, path))


# ------------------------------------------------------------------------------------------ eval reports
EVAL_SHAPE = "an rwp-fast eval report, {\"results\": {\"n\": N, \"natural\": accuracy, ...}, \"weights\": ...}"


def read_eval_report(path):
    """An ``rwp-fast eval --out`` JSON, checked: 'results' with 'n' and at least one attack's accuracy in
    [0, 1]; 'weights' ema or raw where present; 'config' a RunConfig dict where present."""
    data = _object(read_json(path, EVAL_SHAPE), path, EVAL_SHAPE)
    results = data.get("results")
    if not isinstance(results, dict):
        raise FileShapeError(f"{path}: 'results' is {'missing' if results is None else _type_name(results)}; "
                             f"expected {EVAL_SHAPE}")
    n = results.get("n")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise FileShapeError(f"{path}: results.n is {n!r}; expected the number of test examples, {EVAL_SHAPE}")
    found = [a for a in ATTACKS if a in results]
    if not found:
        raise FileShapeError(f"{path}: 'results' holds no attack's accuracy (one of {', '.join(ATTACKS)}); "
                             f"expected {EVAL_SHAPE}")
    for a in found:
        if not (_is_number(results[a]) and 0 <= results[a] <= 1):
            raise FileShapeError(f"{path}: results.{a} is {results[a]!r}; expected an accuracy in [0, 1]")
    if data.get("weights", "raw") not in ("ema", "raw"):
        raise FileShapeError(f"{path}: 'weights' is {data['weights']!r}; expected ema or raw")
    if "config" in data:
        config_dict(data["config"], path)
    return data


# ------------------------------------------------------------------------------------------ outputs
def _json_object(path):
    try:
        data = read_json(path, "JSON")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_matplotlib_png(path):
    """A PNG that matplotlib wrote (its tEXt 'Software' chunk): a figure, never a data set's image."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"matplotlib" in head


def _first_line(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline()
    except (OSError, UnicodeDecodeError):
        return ""


class OutputKind:
    """A kind of file a command writes: `what` names it; `recognises(path)` says whether an existing file
    is one (so that the command may replace it); `owns`: the RUN_FILES names it may replace (its own)."""

    def __init__(self, what, recognises, owns=()):
        self.what, self.recognises, self.owns = what, recognises, owns


OUTPUT_KINDS = {
    "eval": OutputKind("rwp-fast eval report (JSON)", lambda p: _ok(read_eval_report, p)),
    "verify": OutputKind("rwp-fast verify report (JSON)",
                         lambda p: {"verdict", "rows"} <= set(_json_object(p) or ())),
    "bench": OutputKind("rwp-fast bench report (JSON)",
                        lambda p: (_json_object(p) or {}).get("kind") == "rwp-fast bench"),
    "figure": OutputKind("figure (a PNG that matplotlib wrote)", _is_matplotlib_png),
    "summary_csv": OutputKind("sweep summary (CSV)", lambda p: _first_line(p).startswith("point,")),
    "sweep": OutputKind("sweep.json of rwp-fast sweep", lambda p: _ok(read_sweep_file, os.path.dirname(p)),
                        owns=(SWEEP_FILE,)),
    "export_card": OutputKind("model card of rwp-fast export",
                              lambda p: {"format", "architecture", "input"} <= set(_json_object(p) or ())),
    "model_info": OutputKind("RobustBench model-info JSON of rwp-fast export",
                             lambda p: {"architecture", "eps", "autoattack_acc"} <= set(_json_object(p) or ())),
    "export_weights": OutputKind("model.pt of rwp-fast export (next to its model_card.json)",
                                 lambda p: OUTPUT_KINDS["export_card"].recognises(
                                     os.path.join(os.path.dirname(p), "model_card.json"))),
}


def _ok(reader, *args):
    try:
        reader(*args)
        return True
    except (OSError, ValueError):
        return False
