"""Atomic file writes, for checkpoints and data caches: a crash at any moment leaves the old file or the new
one, never a torn one, and nothing that was there before an error is lost."""

import os
import tempfile


def atomic_write(path, write, prefix=None):
    """Call ``write(f)`` on a binary temporary file in ``path``'s directory, fsync it, rename it over
    ``path`` and fsync the directory. The temporary file is removed if anything raises."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
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
