"""``python -m rwp_fast.sweep --run-point RUN_DIR``: one child process of ``rwp-fast sweep --parallel N``."""

import argparse

from .run import run_point

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m rwp_fast.sweep")
    p.add_argument("--run-point", required=True, metavar="RUN_DIR")
    run_point(p.parse_args().run_point)
