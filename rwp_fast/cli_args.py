"""The command line's RunConfig flags (one per field, help from config.py's comments) and the checks on
integers that every subcommand shares (rwp-fast train, sweep, export, ...). Output paths are checked by
rwp_fast._fs (check_output_file, check_output_dir)."""

import argparse
import dataclasses
import inspect
import os
import re

from . import config as config_module
from .config import BACKENDS, FLAGS, ConfigError, RunConfig, preset

BACKEND_ENV = "RWP_FAST_BACKEND"  # the environment's --backend (rwp_fast.ops.dispatch reads it too)


def _allowed_values(match):
    """'one of DATASETS' → 'one of digits, cifar10, ...' (left as written if config has no such tuple)."""
    values = getattr(config_module, match.group(1), None)
    return "one of " + ", ".join(values) if isinstance(values, tuple) else match.group(0)


def _field_help():
    """Help text of each RunConfig field: the comment on its line in config.py (one source of truth)."""
    helps = {}
    for line in inspect.getsource(RunConfig).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], |]+ = .*?#\s*(.*)$", line)
        if m:
            # "one of DATASETS" in config.py's comment → the values themselves in the help text
            helps[m.group(1)] = re.sub(r"one of ([A-Z_]+)", _allowed_values, m.group(2))
    return helps


def add_config_flags(parser):
    """One flag per RunConfig field, named after it (or as in config.FLAGS: --epsilon sets epsilon_255);
    defaults are None so that we can tell which flags were given."""
    helps = _field_help()
    group = parser.add_argument_group("run configuration (mirrors rwp_fast.config.RunConfig)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + FLAGS.get(f.name, f.name).replace("_", "-")
        default = f.default
        text = f"{helps.get(f.name, '')} (default: {default})"
        if isinstance(default, bool) or f.type in ("bool | None", bool | None):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=f.name, type=int, nargs="*", default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=type(default), default=None, help=text)


def config_from_args(args):
    """The RunConfig of the flags (over --preset where given), validated. The backend is the flag's, else
    $RWP_FAST_BACKEND's, else the default: the environment fills in only a flag that was not given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    if "backend" not in given and env_backend():
        given["backend"] = env_backend()
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    if args.preset:
        return preset(args.preset, **given)
    return RunConfig(**given).validate()


def env_backend():
    """$RWP_FAST_BACKEND checked against config.BACKENDS, or None where it is not set: the backend of a run
    whose --backend is not given (train, sweep, demo)."""
    value = os.environ.get(BACKEND_ENV, "").strip()
    if value and value not in BACKENDS:
        raise ConfigError(f"backend: {BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value or None


def check_int(value, flag, minimum):
    if value < minimum:
        raise ConfigError(f"{flag}: must be an integer >= {minimum}, got {value}")
