"""Microbenchmark of the fused op ``pgd_step`` (SPEC.md §1): one PGD step on CIFAR-sized batches.

    python -m rwp_fast.bench.bench_pgd_step --device cuda --json out/bench_pgd_step.json

Implementations, timed in the same process on the same inputs: ``eager`` (the reference
``pgd_step_ref``, a chain of ~10 torch kernels), ``compile`` (torch.compile of it), and the fused
``triton`` and ``cuda`` backends through ``rwp_fast.ops.pgd_step`` writing into a preallocated ``out``.
Every implementation is checked against the reference before it is timed.

GB/s counts the fused op's compulsory traffic: x_adv, grad and x_nat read once and x written once,
4·N·element_size bytes (the L2 kernel re-reads rows from cache only for rows over 4096 elements).
"""

import functools

import torch

from rwp_fast.bench import common  # first: without CUDA it turns on TRITON_INTERPRET before a kernel import

from rwp_fast import ops
from rwp_fast.reference.pgd_step import pgd_step_ref
from rwp_fast.verify import tolerances

try:
    import pytest
except ImportError:  # the GPU machine may run the CLI without pytest
    pytest = None

OP = "pgd_step"
EPS_ALPHA = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 15 / 255)}  # SPEC.md §1, CIFAR-10
# Training batch 128 (AT) and 512 (evaluation / large-batch attacks), CIFAR images 3×32×32.
CASES = [(128, "linf"), (512, "linf"), (128, "l2"), (512, "l2")]
IMAGE = (3, 32, 32)
SMOKE_CASES = [(4, "linf"), (4, "l2")]
SMOKE_IMAGE = (3, 8, 8)


def make_inputs(batch, image, norm, device, dtype=torch.float32):
    shape = (batch, *image)
    eps = EPS_ALPHA[norm][0]
    x_nat = torch.rand(shape, device=device)
    x_adv = (x_nat + (torch.rand(shape, device=device) * 2 - 1) * eps / 2).clamp(0, 1)
    grad = torch.randn(shape, device=device)
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def _check(fn, expected, norm):
    def check():
        got = fn()
        if norm == "linf":
            # Bit-exact even compiled: the only product, α·sign(g), is exact, so an FMA contraction by
            # Inductor cannot change a rounding.
            if not torch.equal(got, expected):
                raise AssertionError("L∞ step differs from pgd_step_ref (must be bit-exact)")
        else:  # row norms summed in another order: the error model of tolerances.PGD_L2_ATOL
            torch.testing.assert_close(got, expected, atol=tolerances.PGD_L2_ATOL, rtol=0)
    return check


def implementations(x_adv, grad, x_nat, norm, device, compile_=True, fused=None):
    """[(impl, fn, check, skip reason)], eager first."""
    eps, alpha = EPS_ALPHA[norm]
    eager = functools.partial(pgd_step_ref, x_adv, grad, x_nat, alpha, eps, norm)
    expected = eager()
    impls = [("eager", eager, None, None)]
    if compile_:
        compiled, reason = common.try_compile(pgd_step_ref)
        fn = None if compiled is None else functools.partial(compiled, x_adv, grad, x_nat, alpha, eps, norm)
        impls.append(("compile", fn, fn and _check(fn, expected, norm), reason))
    out = torch.empty_like(x_adv)
    for name, reason in fused if fused is not None else common.fused_backends(device, OP):
        fn = None if reason else functools.partial(ops.pgd_step, x_adv, grad, x_nat, alpha, eps, norm,
                                                   out=out, backend=name)
        impls.append((name, fn, fn and _check(fn, expected, norm), reason))
    return impls


def run(device, json_path=None, quick=False, compile_=True):
    meta = common.run_metadata(device)
    rows = []
    for batch, norm in SMOKE_CASES if quick else CASES:
        image = SMOKE_IMAGE if quick else IMAGE
        x_adv, grad, x_nat = make_inputs(batch, image, norm, device)
        case = f"{norm} {batch}x{'x'.join(map(str, image))} fp32"
        rows += common.run_case(meta, OP, case, implementations(x_adv, grad, x_nat, norm, device, compile_),
                                device, 4 * x_adv.numel() * x_adv.element_size())
    common.print_table(rows)
    common.write_json(rows, json_path)
    return rows


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run(args.device, args.json, args.quick, not args.no_compile)


if pytest is not None:
    @pytest.mark.parametrize("batch,norm", SMOKE_CASES)
    # Not "eager": it is the reference that the others are checked against, so it would compare with nothing.
    @pytest.mark.parametrize("impl", ["triton"])
    def test_pgd_step_bench(benchmark, impl, batch, norm):
        """CPU smoke: every implementation runs and matches the reference (tiny sizes)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        x_adv, grad, x_nat = make_inputs(batch, SMOKE_IMAGE, norm, device)
        impls = {name: (fn, check, reason) for name, fn, check, reason in implementations(
            x_adv, grad, x_nat, norm, device, compile_=False, fused=[("triton", common.backend_error(
                "triton", device, OP))])}
        fn, check, reason = impls[impl]
        if fn is None:
            pytest.skip(reason)
        if check is not None:
            check()
        benchmark(fn)


if __name__ == "__main__":
    main()
