"""Microbenchmark of the fused op ``lsc_loss`` (SPEC.md §2): masked mean CE, forward + backward.

    python -m rwp_fast.bench.bench_lsc_loss --device cuda --json out/bench_lsc_loss.json

One timed call is what an RWP probe does with the logits: the per-example loss, the LSC mask
p ≤ ℓᵢ < q, the masked mean (1/B)·Σ Vᵢℓᵢ and its gradient d/dlogits. Implementations, timed in the same
process on the same inputs: ``eager`` (the reference ``lsc_loss_ref`` + autograd), ``compile``
(torch.compile of the reference, its backward through AOTAutograd), and the fused ``triton`` and
``cuda`` backends of ``rwp_fast.ops.lsc_loss`` (one forward and one backward kernel).
Each is checked against the reference before it is timed.

GB/s counts the fused op's compulsory traffic: the logits read by the forward and again by the backward,
dlogits written, B·C·element_size bytes each, plus the (B,) target and outputs.
"""

import functools

import torch

from rwp_fast.bench import common  # first: without CUDA it turns on TRITON_INTERPRET before a kernel import

from rwp_fast import ops
from rwp_fast.reference.lsc_loss import lsc_loss_ref, lsc_loss_trades_ref

try:
    import pytest
except ImportError:  # the GPU machine may run the CLI without pytest
    pytest = None

OP = "lsc_loss"
C_MIN = 1.7  # SPEC.md §2, CIFAR-10 RWP: the range [0, c_min)
TRADES_BETA = 6.0
# (entry, batch, classes): CIFAR-10 at the evaluation batch 512, CIFAR-100 and a 1000-class head at the
# training batch 128; TRADES at CIFAR-10's training batch.
CASES = [("ce", 512, 10), ("ce", 128, 100), ("ce", 128, 1000), ("trades", 128, 10)]
SMOKE_CASES = [("ce", 7, 10), ("trades", 7, 10)]


def make_inputs(entry, batch, classes, device, dtype=torch.float32):
    logits = [(torch.randn(batch, classes, device=device) * 3).to(dtype).requires_grad_(True)]
    if entry == "trades":
        logits.append((logits[0].detach() + torch.randn_like(logits[0])).requires_grad_(True))
    target = torch.randint(0, classes, (batch,), device=device)
    return logits, target


def _fwd_bwd(loss_fn, logits, target):
    """The masked mean and its gradient w.r.t. every logits tensor (no .grad accumulation)."""
    extra = (TRADES_BETA,) if len(logits) == 2 else ()
    mean = loss_fn(*logits, target, *extra, 0.0, C_MIN)[0]
    return (mean, *torch.autograd.grad(mean, logits))


def _check(fn, expected):
    def check():
        for got, want in zip(fn(), expected):
            # fp32 log-sum-exp in another summation order: see tests/test_lsc_loss.py.
            torch.testing.assert_close(got, want, rtol=2e-5, atol=3e-5)
    return check


def implementations(entry, logits, target, device, compile_=True, fused=None):
    """[(impl, fn, check, skip reason)], eager first."""
    ref = lsc_loss_ref if entry == "ce" else lsc_loss_trades_ref
    eager = functools.partial(_fwd_bwd, ref, logits, target)
    expected = [t.detach() for t in eager()]
    impls = [("eager", eager, None, None)]
    if compile_:
        compiled, reason = common.try_compile(ref)
        fn = None if compiled is None else functools.partial(_fwd_bwd, compiled, logits, target)
        impls.append(("compile", fn, fn and _check(fn, expected), reason))
    public = ops.lsc_loss if entry == "ce" else ops.lsc_loss_trades
    for name, reason in fused if fused is not None else common.fused_backends(device, OP):
        fn = None if reason else functools.partial(_fwd_bwd, functools.partial(public, backend=name),
                                                   logits, target)
        impls.append((name, fn, fn and _check(fn, expected), reason))
    return impls


def bytes_moved(logits):
    # Each logits tensor read twice (forward, backward) and its gradient written once.
    batch, classes = logits[0].shape
    return len(logits) * 3 * batch * classes * logits[0].element_size() + batch * (8 + 4 * 4)


def run(device, json_path=None, quick=False, compile_=True):
    meta = common.run_metadata(device)
    rows = []
    for entry, batch, classes in SMOKE_CASES if quick else CASES:
        logits, target = make_inputs(entry, batch, classes, device)
        case = f"{entry} fwd+bwd {batch}x{classes} fp32"
        rows += common.run_case(meta, OP, case, implementations(entry, logits, target, device, compile_),
                                device, bytes_moved(logits))
    common.print_table(rows)
    common.write_json(rows, json_path)
    return rows


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run(args.device, args.json, args.quick, not args.no_compile)


if pytest is not None:
    @pytest.mark.parametrize("entry,batch,classes", SMOKE_CASES)
    # Not "eager": it is the reference that the others are checked against, so it would compare with nothing.
    @pytest.mark.parametrize("impl", ["triton"])
    def test_lsc_loss_bench(benchmark, impl, entry, batch, classes):
        """CPU smoke: every implementation runs and matches the reference (tiny sizes)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logits, target = make_inputs(entry, batch, classes, device)
        impls = {name: (fn, check, reason) for name, fn, check, reason in implementations(
            entry, logits, target, device, compile_=False,
            fused=[("triton", common.backend_error("triton", device, OP))])}
        fn, check, reason = impls[impl]
        if fn is None:
            pytest.skip(reason)
        if check is not None:
            check()
        benchmark(fn)


if __name__ == "__main__":
    main()
