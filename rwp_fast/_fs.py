"""Outputs: the one check every output path of every command goes through before any work starts, and
atomic writes for checkpoints, data caches and reports.

``check_output_file(path, flag, kind)`` and ``check_output_dir(path, flag, files)`` refuse, with a
ConfigError naming the flag (one line, exit status 2), a path that

* is a directory where a file is written (or a file where a directory is);
* lies under a file, or in a directory that does not exist (a file) or cannot be created (a directory);
* has a name longer than the file system allows (NAME_MAX per component, PATH_MAX in all);
* lies in a directory where this process cannot create files;
* exists and is not a file that this kind of output wrote: a run's config.json, metrics.jsonl, checkpoints,
  sweep.json (``readers.RUN_FILES``), a data set's image or array, or any file that the kind's recogniser
  (``readers.OUTPUT_KINDS``) does not know: a command replaces only what an earlier run of it wrote.

Nothing is created by the checks: they read, and write a probe file that they remove again.

``atomic_write``: a crash at any moment leaves the old file or the new one, never a torn one, and nothing
that was there before an error is lost.
"""

import os
import tempfile

from .config import ConfigError
from .readers import OUTPUT_KINDS, RUN_FILES

FALLBACK_NAME_MAX, FALLBACK_PATH_MAX = 255, 4096


def _limit(directory, name, fallback):
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError, AttributeError):
        return fallback


def _existing_ancestor(path):
    """(nearest existing ancestor of `path`, the components below it that do not exist yet)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        current, tail = os.path.split(current)
        missing.insert(0, tail)
    return current, missing


def _check_path(path, flag, allowed):
    """Length limits, no file among the ancestors, a writable nearest existing directory; returns it."""
    if not path.strip():
        raise ConfigError(f"{flag}: the path is empty; allowed: {allowed}")
    ancestor, missing = _existing_ancestor(path)
    if not missing:   # it exists: a directory receives its files, a file's replacement goes beside it
        ancestor = os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    elif not os.path.isdir(ancestor):   # a file (or a link to one) on the way: the path lies under it
        raise ConfigError(f"{flag}: {path!r} lies under {ancestor!r}, which is a file; allowed: {allowed}")
    name_max = _limit(ancestor, "PC_NAME_MAX", FALLBACK_NAME_MAX)
    for part in missing + [os.path.basename(os.path.abspath(path))]:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{flag}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes, over this file "
                              f"system's limit of {name_max}; allowed: {allowed}")
    path_max = _limit(ancestor, "PC_PATH_MAX", FALLBACK_PATH_MAX)
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise ConfigError(f"{flag}: the path {path[:60]!r}... is {len(os.fsencode(os.path.abspath(path)))} bytes, "
                          f"over this file system's limit of {path_max}; allowed: {allowed}")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".rwp-fast-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {ancestor!r} ({exc.strerror or exc}); allowed: {allowed}") \
            from None
    return ancestor


def _refuse_existing(path, flag, kind):
    """A ConfigError if the existing file `path` is not one that output `kind` may replace."""
    name = os.path.basename(path)
    kind = OUTPUT_KINDS[kind]
    if name in RUN_FILES and name not in kind.owns:
        raise ConfigError(f"{flag}: {path!r} is a run's {name}, which no command writes over; allowed: a new "
                          f"path, or an earlier {kind.what}")
    if not kind.recognises(path):
        raise ConfigError(f"{flag}: {path!r} exists and is not an earlier {kind.what}, so it is not replaced; "
                          f"allowed: a new path, or an earlier {kind.what}")


def check_output_file(path, flag, kind):
    """`path` may receive an output of kind `kind` (a key of readers.OUTPUT_KINDS): see the module
    docstring. Its directory must exist. Nothing is created. A ConfigError naming `flag` otherwise."""
    path = os.fspath(path)
    allowed = f"a new file path in an existing, writable directory, or an earlier {OUTPUT_KINDS[kind].what}"
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        raise ConfigError(f"{flag}: {path!r} is {'a' if os.path.isdir(path) else 'named as a'} directory; "
                          f"allowed: {allowed}")
    directory = os.path.dirname(os.path.abspath(path))
    if _check_path(path, flag, allowed) != directory:
        raise ConfigError(f"{flag}: the directory {directory!r} of {path!r} does not exist; allowed: {allowed}")
    if os.path.lexists(path):
        _refuse_existing(path, flag, kind)


def check_output_dir(path, flag, files=()):
    """`path` may be a directory of outputs (created later, by whoever writes, if missing): no file there
    or above it, names within the limits, writable. files: [(relative path, kind)] that will be written
    in it, each checked as check_output_file checks it where it exists. Nothing is created."""
    path = os.fspath(path)
    allowed = "a writable directory (created if missing)"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a file, not a directory; allowed: {allowed}")
    _check_path(path, flag, allowed)
    for rel, kind in files:
        inner = os.path.join(path, rel)
        if os.path.isdir(inner):
            raise ConfigError(f"{flag}: {inner!r} is a directory where rwp-fast writes its "
                              f"{OUTPUT_KINDS[kind].what}; allowed: {allowed}, without that directory")
        _check_path(inner, flag, allowed)
        if os.path.lexists(inner):
            _refuse_existing(inner, flag, kind)


def atomic_write(path, write, prefix=None, mode="wb"):
    """Call ``write(f)`` on a temporary file (binary, or text with mode 'w') in ``path``'s directory, fsync
    it, rename it over ``path`` and fsync the directory. The temporary file is removed if anything raises."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or os.path.basename(path)[:200] + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
