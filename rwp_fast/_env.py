"""What every report of this machine records (``rwp-fast verify``, ``rwp-fast bench``, the microbenchmarks),
and the comma-separated flag parser their command lines share. Standard library only at import time."""

import argparse
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def csv_list(choices=None, kind=str):
    """argparse type: "a,b" → [kind(a), kind(b)], each in ``choices`` when given; empty is an error."""
    def parse(text):
        try:
            items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values; got {text!r}") \
                from exc
        bad = [i for i in items if choices is not None and i not in choices]
        if bad or not items:
            allowed = f"a comma-separated subset of {','.join(map(str, choices))}" if choices is not None \
                else f"comma-separated {kind.__name__} values"
            raise argparse.ArgumentTypeError(f"expected {allowed}; got {text!r}")
        return items
    return parse


def git_commit():
    """HEAD of the checkout this package runs from, '+dirty' if tracked files differ; None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
