"""``python -m bench``: the end-to-end throughput suite (``bench/bench_e2e.py``); ``--help`` lists the flags.

The per-op microbenchmarks run as ``python -m bench.bench_<op>``.
"""

from .bench_e2e import main

main()
