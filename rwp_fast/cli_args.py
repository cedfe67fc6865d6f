"""The command line's RunConfig flags (one per field, help from config.py's comments) and the checks on
paths and integers that every subcommand shares (rwp-fast train, sweep, export, ...)."""

import argparse
import dataclasses
import inspect
import os
import re
import tempfile

from . import config as config_module
from .config import FLAGS, ConfigError, RunConfig, preset


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
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    if args.preset:
        return preset(args.preset, **given)
    return RunConfig(**given).validate()


# ------------------------------------------------------------------------------------------ outputs
def _write_probe(directory):
    """Create and remove a file in `directory`: the one sure test that it is writable (OSError if not)."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".rwp-fast-write-probe.")
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path, flag):
    """Create directory `path` (and its parents) if missing and write a probe file there; a ConfigError
    naming `flag` if that fails (a parent that is a file, no permission, read-only file system)."""
    try:
        os.makedirs(path, exist_ok=True)
        _write_probe(path)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot create or write directory {path!r} ({exc.strerror or exc}); "
                          "allowed: a writable directory (created if missing)") from None


def check_writable_file(path, flag):
    """An output file may be written at `path`: its directory exists and is writable, and `path` is not a
    directory. Nothing is created. A ConfigError naming `flag` otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a directory; allowed: a file path in a writable directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag}: the directory {directory!r} of {path!r} does not exist; allowed: a file "
                          "path in an existing, writable directory")
    try:
        _write_probe(directory)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {directory!r} ({exc.strerror or exc}); allowed: a file "
                          "path in an existing, writable directory") from None


def check_int(value, flag, minimum):
    if value < minimum:
        raise ConfigError(f"{flag}: must be an integer >= {minimum}, got {value}")
