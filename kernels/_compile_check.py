"""Compile every Triton kernel variant for an NVIDIA target ahead of time, without a GPU.

    python -m rwp_fast.kernels._compile_check [pgd_step lsc_loss weight_perturb] [--arch 90]

CI has no GPU and runs the kernels under ``TRITON_INTERPRET=1``, which is lenient: it does not type-check
loop-carried values, pointer dtypes or constexpr branches the way the compiler does. This script runs
the real front end and ptxas for each launch configuration the host functions can choose (every storage
dtype, both L2 paths, both signs, with and without β), so a kernel that only the compiler would reject
fails on CPU too. It also checks that the kernels which must round like torch (``NO_FMA`` launches)
contain no fused multiply-add. It must run without ``TRITON_INTERPRET`` (the tests start it in a
subprocess). Exit status: the number of failures.
"""

# The signatures below are dict(param=type) calls on purpose: they read like the kernels' parameter lists.
# ruff: noqa: C408

import argparse
import os
import sys

STORAGE = ("fp32", "fp16", "bf16")


def _variants(op):
    """[(kernel, signature without constexprs, constexprs, options, must_have_no_fma)] for one op."""
    if op == "pgd_step":
        from . import pgd_step as k
        out = []
        for dt in STORAGE:
            p = f"*{dt}"
            img = dict(x_adv_ptr=p, grad_ptr=p, x_nat_ptr=p, out_ptr=p)
            out += [
                (k._pgd_step_linf_kernel, {**img, "n_elements": "i32", "alpha": "fp32", "eps": "fp32"},
                 dict(BLOCK=k.LINF_BLOCK), dict(num_warps=4, **k.NO_FMA), True),
                (k._pgd_random_init_linf_kernel,
                 dict(x_nat_ptr=p, noise_ptr="*fp32", out_ptr=p, n_elements="i32", eps="fp32"),
                 dict(BLOCK=k.LINF_BLOCK), dict(num_warps=4, **k.NO_FMA), True),
            ]
            for block, one_pass in ((4096, True), (16, True), (k.L2_STREAM_BLOCK, False)):
                out += [
                    (k._pgd_step_l2_kernel,
                     {**img, "row_numel": "i32", "alpha": "fp32", "eps": "fp32", "grad_eps": "fp32"},
                     dict(BLOCK=block, ONE_PASS=one_pass), dict(num_warps=8 if block >= 2048 else 4), False),
                    (k._pgd_random_init_l2_kernel,
                     dict(x_nat_ptr=p, noise_ptr="*fp32", radius_ptr="*fp32", out_ptr=p, row_numel="i32",
                          eps="fp32"),
                     dict(BLOCK=block, ONE_PASS=one_pass), dict(num_warps=4), False),
                ]
        return out
    if op == "lsc_loss":
        from . import lsc_loss as k
        out = []
        for dt in STORAGE:
            p = f"*{dt}"
            for block in (16, 1024):
                nw = dict(num_warps=4 if block >= 1024 else 1)
                out += [
                    (k._lsc_loss_fwd_kernel,
                     dict(logits_ptr=p, target_ptr="*i64", loss_ptr="*fp32", mask_ptr="*i1", count_ptr="*i32",
                          masked_mean_ptr="*fp32", lse_ptr="*fp32", n_cols="i32", batch="fp32", p="fp32",
                          q="fp32"), dict(BLOCK=block), nw, False),
                    (k._lsc_loss_bwd_kernel,
                     dict(grad_out_ptr="*fp32", logits_ptr=p, target_ptr="*i64", lse_ptr="*fp32", mask_ptr="*i1",
                          dlogits_ptr=p, n_cols="i32", batch="fp32"), dict(BLOCK=block), nw, False),
                    (k._lsc_loss_trades_fwd_kernel,
                     dict(nat_ptr=p, adv_ptr=p, target_ptr="*i64", loss_ptr="*fp32", mask_ptr="*i1",
                          count_ptr="*i32", masked_mean_ptr="*fp32", lse_nat_ptr="*fp32", lse_adv_ptr="*fp32",
                          kl_ptr="*fp32", n_cols="i32", batch="fp32", beta="fp32", p="fp32", q="fp32"),
                     dict(BLOCK=block), nw, False),
                    (k._lsc_loss_trades_bwd_kernel,
                     dict(grad_out_ptr="*fp32", nat_ptr=p, adv_ptr=p, target_ptr="*i64", lse_nat_ptr="*fp32",
                          lse_adv_ptr="*fp32", kl_ptr="*fp32", mask_ptr="*i1", d_nat_ptr=p, d_adv_ptr=p,
                          n_cols="i32", batch="fp32", beta="fp32"), dict(BLOCK=block), nw, False),
                ]
        return out
    if op == "weight_perturb":
        from . import weight_perturb as k
        table = dict(chunk_seg_ptr="*i32", chunk_start_ptr="*i64", offsets_ptr="*i64")
        out = [(k._segment_sum_kernel, dict(partial_ptr="*fp32", seg_chunk_start_ptr="*i32", out_ptr="*fp32"),
                dict(BLOCK=k.REDUCE_BLOCK), dict(num_warps=1), False)]
        for dt in STORAGE:
            p = f"*{dt}"
            for chunk in (64, 4096):
                nw = dict(num_warps=k._num_warps(chunk))
                out += [
                    (k._segment_sq_norm_partial_kernel, dict(x_ptr=p, **table, partial_ptr="*fp32"),
                     dict(CHUNK=chunk), nw, False),
                    (k._accumulate_sq_norm_partial_kernel,
                     dict(a_ptr=p, g_ptr=p, beta_ptr="*fp32", **table, partial_ptr="*fp32"),
                     dict(CHUNK=chunk, HAS_BETA=True), {**nw, **k.NO_FMA}, True),
                    (k._accumulate_sq_norm_partial_kernel,
                     dict(a_ptr=p, g_ptr=p, beta_ptr=p, **table, partial_ptr="*fp32"),
                     dict(CHUNK=chunk, HAS_BETA=False), {**nw, **k.NO_FMA}, True),
                ]
                for sign in (1, -1):
                    out.append((k._perturb_axpy_kernel, dict(w_ptr=p, a_ptr=p, scale_ptr="*fp32", **table),
                                dict(CHUNK=chunk, SIGN=sign), {**nw, **k.NO_FMA}, True))
        return out
    raise ValueError(f"op: expected pgd_step, lsc_loss or weight_perturb, got {op!r}")


def check(ops, arch=90):
    """Compile every variant of `ops` for sm_`arch`; returns a list of failure messages."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = []
    for op in ops:
        for kernel, signature, constexprs, options, no_fma in _variants(op):
            name = f"{op}.{kernel.fn.__name__}{signature[next(iter(signature))]}{constexprs}"
            try:
                src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                                constexprs=constexprs)
                ptx = triton.compile(src, target=target, options=options).asm["ptx"]
            except Exception as exc:  # noqa: BLE001  report every failing variant, not just the first
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:1500]}")
                continue
            if no_fma and "fma.rn.f32" in ptx:
                failures.append(f"{name}: contains fma.rn.f32 although launched with NO_FMA")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", default=["pgd_step", "lsc_loss", "weight_perturb"])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100) or 90 (H100)")
    args = parser.parse_args(argv)
    failures = check(args.ops, args.arch)
    for f in failures:
        print("FAIL", f)
    print(f"{len(failures)} failure(s)")
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
