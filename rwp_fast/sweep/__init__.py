"""``rwp-fast sweep``: run a grid of ordinary runs, skip what is finished, summarise it as a table and a figure.

    rwp-fast sweep --preset P --grid "c_min=1.0,1.5,1.7,2.0" --grid "k2=1,5,10" --out-dir runs/sweep
    rwp-fast sweep --preset P --lsc-ranges "0:0.5,0.5:1,1:1.5,1.5:2,2:inf" --seeds 0,1,2
    rwp-fast sweep --summarize runs/sweep

* ``--grid FIELD=V1,V2,...`` sweeps any RunConfig field (repeat the flag for more fields); the points are
  the product of the grids, or with ``--zip`` the grids taken element by element (equal lengths).
  Tuple fields take their elements joined by '/', e.g. ``lr_milestones=100/150,50/75``.
* ``--lsc-ranges "p:q,..."`` sets ``lsc_low = p`` and ``c_min = q`` together: the LSC-range analysis of
  the paper's Fig. 1 (the perturbation is built only from the adversarial examples with loss in [p, q)).
* ``--seeds 0,1,2`` repeats every point once per seed.

Each (point, seed) is an ordinary run directory under the sweep directory, named after its values
(``c_min=1.5_k2=10_seed=0``; an LSC range is ``lsc=0.5-1.0``), so ``rwp-fast train --resume``,
``eval`` and ``plot`` work on it. ``sweep.json`` lists the points; a finished run gets ``done.json``.
Started again, a sweep skips finished runs, resumes an interrupted one from its last.pt, and refuses a
directory that holds a run of another configuration.

Runs go one after another in this process. ``--parallel N`` runs N at once as child processes (log in
``RUN/train.log``): one per GPU, round robin, when there are several; on a CPU-only machine only when
N > 1 is given, with the cores split between them (OMP threads = cores // N).

When the runs are done (or with ``--summarize DIR`` at any time) it writes ``summary.csv``, prints one
table (best and last PGD test robust accuracy, their difference: the robust-overfitting gap, natural
accuracy, mean RWP probes per step, images/s; mean ± sample std over seeds) and draws ``summary.png``.
"""

from .cli import add_arguments, main
from .grid import (DEMO_LSC_RANGES, LSC_KEY, NOT_IDENTITY, SWEEP_FILE, Sweep, build_sweep, expand_points,
                   load_sweep_file, parse_grid, parse_lsc_ranges, parse_seeds, parse_value, run_name,
                   save_sweep_file, value_label)
from .plot import plot_summary
from .run import DONE_FILE, POINT_FILE, run_one, run_parallel, run_status, run_sweep
from .stats import STAT_COLUMNS, read_rows, run_stats
from .summary import SUMMARY_CSV, SUMMARY_OUTPUTS, SUMMARY_PNG, summarize, summary_table

__all__ = [
    "DEMO_LSC_RANGES", "DONE_FILE", "LSC_KEY", "NOT_IDENTITY", "POINT_FILE", "STAT_COLUMNS", "SUMMARY_CSV",
    "SUMMARY_OUTPUTS",
    "SUMMARY_PNG", "SWEEP_FILE", "Sweep", "add_arguments", "build_sweep", "expand_points", "load_sweep_file",
    "main", "parse_grid", "parse_lsc_ranges", "parse_seeds", "parse_value", "plot_summary", "read_rows",
    "run_name", "run_one", "run_parallel", "run_stats", "run_status", "run_sweep", "save_sweep_file",
    "summarize", "summary_table", "value_label",
]
