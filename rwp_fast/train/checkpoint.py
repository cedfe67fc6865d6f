"""Atomic checkpoints that hold everything needed to continue a run exactly.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``:

    format_version, config (dict), epoch (completed epochs), step (optimizer steps so far),
    best_metric, best_epoch, model, optimizer, scheduler (state dicts), rng (python, numpy,
    torch CPU, CUDA states), metrics_lines (how many lines of metrics.jsonl belong to this state)

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the target, and
the directory is fsync'ed: a crash at any moment leaves either the old file or the new one, never a
torn one. A corrupt or mismatched file raises CheckpointError and changes nothing on disk.

``load_checkpoint`` is the one reader of checkpoints (rwp_fast/readers.py lists the others): it checks the
keys, the config (a RunConfig dict) and the counters. ``check_checkpoint_of_run`` checks, on resume, that
last.pt belongs to the run directory it sits in.
"""

import os
import random
import re
import zipfile

import numpy as np
import torch

from .._fs import atomic_write
from ..config import ConfigError, RunConfig
from ..readers import METRICS_FILE, read_metrics, read_run_config

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "epoch", "step", "model", "optimizer", "scheduler", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def save_checkpoint(path, state):
    """Write `state` to `path` atomically (temp file + fsync + rename + directory fsync)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and sanity-check a checkpoint with ``weights_only=True``; raise CheckpointError if unusable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled objects, ...
        raise CheckpointError(f"checkpoint {path}: not an rwp-fast checkpoint: cannot be read, "
                              f"{_why_unreadable(path, exc)}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path}: not an rwp-fast checkpoint (missing {missing})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {state['format_version']}, "
                              f"this rwp-fast reads {FORMAT_VERSION}")
    try:
        RunConfig.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its {exc}") from None
    for key in ("epoch", "step"):
        if not (isinstance(state[key], int) and not isinstance(state[key], bool) and state[key] >= 0):
            raise CheckpointError(f"checkpoint {path}: {key} is {state[key]!r}, expected an integer >= 0")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict of tensors")
    return state


# Fields that may differ between last.pt and its run's config.json: the resume overrides (quiet, device,
# epochs: an extension stopped before its first checkpoint) and the directory itself.
RESUME_EXEMPT = ("out_dir", "quiet", "device", "epochs")


def check_checkpoint_of_run(state, path, run_dir):
    """A CheckpointError, naming both, unless the checkpoint `state` (read from `path`) is of the run in
    `run_dir`: the same config as its config.json (model, dataset, shapes, method, every field but
    RESUME_EXEMPT), and no fewer metrics.jsonl lines than it records. A resume would otherwise continue
    another run in this directory, and metrics.jsonl would hold epochs of both."""
    info = read_run_config(run_dir)
    if info is None:
        return
    ours, theirs = RunConfig.from_dict(state["config"]).to_dict(), info["config"]
    diff = [k for k in ours if k not in RESUME_EXEMPT and ours[k] != theirs[k]]
    if diff:
        pairs = ", ".join(f"{k} {ours[k]!r} in last.pt but {theirs[k]!r} in config.json" for k in diff[:4])
        raise CheckpointError(f"resume: {path} is not a checkpoint of the run in {run_dir}: {pairs}"
                              f"{f' (+{len(diff) - 4} more)' if len(diff) > 4 else ''}; resume the run that "
                              "last.pt came from in its own directory")
    lines = state.get("metrics_lines", 0)
    if os.path.lexists(os.path.join(run_dir, METRICS_FILE)) and len(read_metrics(run_dir)) < lines:
        raise CheckpointError(f"resume: {path} records {lines} epoch(s) of metrics but "
                              f"{os.path.join(run_dir, METRICS_FILE)} holds {len(read_metrics(run_dir))}; "
                              "last.pt is not of this run's metrics")


def _why_unreadable(path, exc):
    """One line on why torch.load refused `path`; torch's own text is 4+ lines about weights_only and a
    documentation link, which says nothing about a file that is simply not a checkpoint."""
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        with open(path, "rb") as f:
            head = f.read(8)
        return (f"it is not the zip archive torch.save writes (first bytes: {head.hex(' ') or 'none, empty file'})"
                "; rwp-fast checkpoints are RUN_DIR/best.pt and RUN_DIR/last.pt")
    text = str(exc)
    # weights_only refusals name the cause on a line "WeightsUnpickler error: <cause>" (torch 2.4-2.14)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return f"it holds objects that a weights-only load refuses ({m.group(1).strip().split('. ')[0]})"
    first = text.strip().splitlines()[0] if text.strip() else "no message"
    return f"a zip archive, but not a readable torch.save file ({type(exc).__name__}: {first[:200]})"


def rng_state():
    """All RNG states: python, numpy, torch CPU and every CUDA device."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),  # (int, tuple of ints, float | None): plain values
        "numpy": {"keys": torch.from_numpy(np_state[1].copy()), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy(), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _key_shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _model_key_shapes(name, num_classes, in_channels, mean, std):
    """{key: shape} of build_model(name, ...)'s state dict; the network is built on the meta device (no
    memory, no init: WRN-34-10's 46M weights cost nothing here)."""
    from ..models import Normalize, build_network
    with torch.device("meta"):
        net = build_network(name, num_classes, in_channels)
    shapes = {f"normalize.{k}": s for k, s in _key_shapes(Normalize(mean, std).state_dict()).items()}
    shapes.update({f"net.{k}": s for k, s in _key_shapes(net.state_dict()).items()})
    return shapes


def weights_mismatch(weights, model, num_classes, in_channels, mean, std):
    """None if `weights` (a state dict) fit build_model(model, ...); else one line saying how many keys
    differ (missing, unexpected or of another shape) and which model of config.MODELS they are from."""
    from ..config import MODELS
    want, have = _model_key_shapes(model, num_classes, in_channels, mean, std), _key_shapes(weights)
    differ = len(set(want) ^ set(have)) + sum(1 for k in set(want) & set(have) if want[k] != have[k])
    if differ == 0:
        return None
    sources = [m for m in MODELS if m != model
               and _model_key_shapes(m, num_classes, in_channels, mean, std) == have]
    source = (f"the weights are from {sources[0]}" if sources
              else "the weights fit no model rwp-fast builds for this data")
    return (f"its config says model {model}, but {source} "
            f"({differ} of {len(set(want) | set(have))} keys differ)")
