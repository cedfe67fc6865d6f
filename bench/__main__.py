"""``python -m bench``: the end-to-end throughput suite (``bench/bench_e2e.py``); ``--help`` lists the flags.

A shim: the engine is imported as ``rwp_fast.bench`` (bench/__init__.py says why), which needs the package
installed (``make install``, or ``pip install -e .``). The per-op microbenchmarks run as
``python -m rwp_fast.bench.bench_<op>`` (or ``python -m bench.bench_<op>`` from a checkout).
"""

from rwp_fast.bench.bench_e2e import main

main()
