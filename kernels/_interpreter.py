"""Can this process's Triton interpreter run our kernels? One probe kernel, run once, answers.

Triton 3.6's interpreter turns a runtime loop bound (``range(0, n_cols, BLOCK)`` in ``lsc_loss``) into a
Python int with ``int(array)`` on a 1-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can
be converted to Python scalars"); Triton 3.8 squeezes the array first. The kernels' form is fine (a runtime
loop bound compiles on every GPU Triton), so rather than keep a table of (Triton, numpy) pairs the probe runs
the construct itself. Imported only under ``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl



@triton.jit
def _runtime_bound_loop(out_ptr, n):
    acc = 0
    for _ in range(0, n, 1):
        acc += 1
    tl.store(out_ptr, acc)


def interpreter_refusal():
    """None if the interpreter runs a loop over a runtime bound, else why not (a sentence). Runs the probe
    at each call: its one caller, ``rwp_fast.ops.dispatch.triton_cpu_refusal``, keeps the answer."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_bound_loop[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - InterpreterError wraps whatever the interpreter raised
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with numpy "
                f"{numpy.__version__} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); numpy<2.4 or "
                "Triton>=3.8 runs it")
    return None if int(out) == 3 else f"a 3-trip loop ran {int(out)} times"
