"""``rwp-fast verify``: the fused ops against the reference on this machine (``run.py``), with the one
table of tolerances that the op tests share (``tolerances.py``)."""
