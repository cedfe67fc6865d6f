"""The throughput suites: ``rwp-fast bench`` once installed, ``python -m bench`` in a checkout.

This folder ships as the package ``rwp_fast.bench`` (setup.py's ``package_dir``, as ``kernels/`` ships as
``rwp_fast.kernels``), and that is the one name its modules go by: every import, here and in tests/, is
``rwp_fast.bench.<module>``, so a process holds one copy of each module. ``python -m bench`` (``__main__.py``)
and ``python -m bench.bench_<op>`` only run a file; what it imports comes from ``rwp_fast.bench``.
"""
