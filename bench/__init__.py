"""The throughput suites: ``python -m bench`` in a checkout, ``rwp-fast bench`` once installed.

This folder ships as the package ``rwp_fast.bench`` (setup.py's ``package_dir``, as ``kernels/`` ships as
``rwp_fast.kernels``), so the installed command and the checkout run one copy of the code; modules here
import each other relatively for that reason.
"""
