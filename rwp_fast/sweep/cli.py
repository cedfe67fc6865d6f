"""``rwp-fast sweep``'s flags and command; the package docstring (rwp_fast/sweep/__init__.py) is its help."""

import os
import sys

from .._fs import check_output_dir
from ..cli_args import add_config_flags, check_int, config_from_args
from ..config import PRESETS, ConfigError
from ..readers import CONFIG_FILE
from .grid import DEMO_LSC_RANGES, SWEEP_FILE, build_sweep, parse_grid, parse_lsc_ranges, parse_seeds
from .run import run_sweep
from .summary import SUMMARY_OUTPUTS, summarize


def add_arguments(parser):
    parser.add_argument("--preset", help=f"the base config: a paper preset ({len(PRESETS)}; `rwp-fast presets`)")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="sweep a RunConfig field over values (repeatable; product of the grids)")
    parser.add_argument("--zip", action="store_true", help="pair the grids element by element (equal lengths)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...", help="repeat every point once per seed")
    parser.add_argument("--lsc-ranges", default=None, metavar="P:Q,...",
                        help="LSC ranges [p, q) in nats; each sets lsc_low=p and c_min=q (q may be inf), "
                             f"e.g. {DEMO_LSC_RANGES}")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="runs at once (child processes; one per GPU, round robin; default 1)")
    parser.add_argument("--summarize", metavar="DIR", default=None,
                        help="only write DIR/summary.csv and summary.png and print the table")
    add_config_flags(parser)
    parser.epilog = "--out-dir is the sweep directory (default runs/sweep); each run is a directory in it."
    return parser


def main(args):
    if args.summarize:
        summarize(args.summarize)   # checks its outputs (summary.csv, summary.png) before reading
        return 0
    check_int(args.parallel, "parallel", 1)
    grids = [parse_grid(g) for g in args.grid]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    lsc = parse_lsc_ranges(args.lsc_ranges) if args.lsc_ranges is not None else None
    if not grids and not lsc:
        raise ConfigError("grid: nothing to sweep; give --grid FIELD=V1,V2,... and/or --lsc-ranges P:Q,...")
    if seeds and "seed" in [g[0] for g in grids]:
        raise ConfigError("seeds: give the seeds with --seeds or --grid seed=..., not both")
    sweep_dir = args.out_dir or "runs/sweep"
    args.out_dir = None
    base = config_from_args(args)
    check_output_dir(sweep_dir, "out_dir", [(SWEEP_FILE, "sweep"), *SUMMARY_OUTPUTS])
    if os.path.lexists(os.path.join(sweep_dir, CONFIG_FILE)):  # its sweep.json and summary would sit in a run
        raise ConfigError(f"out_dir: {sweep_dir} holds a run (config.json); a sweep directory holds its runs as "
                          "subdirectories: choose another --out-dir")
    sweep = build_sweep(base, sweep_dir, grids, args.zip, seeds, lsc)
    for name in sweep.configs:   # a run directory's name may pass the file system's limit
        check_output_dir(os.path.join(sweep_dir, name), "out_dir", [("curves.png", "figure")])
    print(f"sweep of {len(sweep.points)} point(s) × {len(seeds or [base.seed])} seed(s) in {sweep_dir}")
    _, failed = run_sweep(sweep, args.parallel)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
