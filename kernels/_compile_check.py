"""Compile every Triton kernel variant for an NVIDIA target ahead of time, without a GPU.

    python -m rwp_fast.kernels._compile_check [pgd_step lsc_loss weight_perturb] [--arch 90]

CI has no GPU and runs the kernels under ``TRITON_INTERPRET=1``, which is lenient: it does not type-check
loop-carried values, pointer dtypes or constexpr branches the way the compiler does. This script runs
the real front end and ptxas for each launch configuration the host functions can choose (every storage
dtype, both L2 paths, both signs, with and without β), so a kernel that only the compiler would reject
fails on CPU too. From the PTX and the cubin of each variant it then asserts:

* rounding: the launches that must round like torch (``NO_FMA``) contain no ``fma.rn.f32``; the
  parity-critical kernels (``pgd_step``, ``weight_perturb``) contain no ``.approx`` instruction, no
  ``div.full`` and no NaN-dropping ``min.f32``/``max.f32``; ``lsc_loss`` contains no ``div.full`` and no
  ``.approx`` other than the ``ex2``/``lg2`` whose error bound kernels/lsc_loss.py states;
* bandwidth (the streaming launches: L∞ and L2 ``pgd_step``, ``weight_perturb`` with CHUNK=4096 on an
  aligned table): every streamed operand is read with 16-byte ``ld.global.v4`` (fp32: 4 elements,
  fp16/bf16: 8), at most ``MAX_SCALAR_LOADS`` scalar loads remain (table lookups, per-segment scalars);
* resources, from ``cuobjdump --dump-resource-usage`` of the cubin: no local memory (no spills) and
  at most ``MAX_REGS`` registers per thread.

Integer arguments are compiled as the launcher specializes them for the shapes that matter (CIFAR's
3·32·32 = 3072, any batch): divisible by 16, like every tensor base pointer from the caching allocator.
It must run without ``TRITON_INTERPRET`` (the tests start it in a subprocess). Exit status: the number
of failures.
"""

# The signatures below are dict(param=type) calls on purpose: they read like the kernels' parameter lists.
# ruff: noqa: C408

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

STORAGE = ("fp32", "fp16", "bf16")
# Registers per thread of the streaming variants on sm_90 (triton 3.8's ptxas):
# weight_perturb on an aligned table 19-32 (71-78 without the alignment hint), L∞ pgd_step 32-35, the
# one-pass L2 kernels 32-64 (a 4096-element row in registers). 64 registers still allow 1,024 resident
# threads per SM (64K registers) and catch a kernel that falls back to scalar code.
MAX_REGS = 64
# Scalar global loads a streaming variant may keep: chunk_seg, chunk_start, the segment end and one
# per-segment scalar (scale or β) for weight_perturb; the row radius for the L2 random start.
MAX_SCALAR_LOADS = 6
# Allowed approximate instructions in lsc_loss (error bound in kernels/lsc_loss.py).
LSC_APPROX_OK = ("ex2.approx", "lg2.approx")


@dataclass
class Variant:
    kernel: object
    signature: dict  # param -> type, without the constexprs
    constexprs: dict
    options: dict
    no_fma: bool = False
    # "ieee": no .approx, no div.full, no NaN-dropping min/max; "lsc": no div.full, .approx only in
    # LSC_APPROX_OK; None: not checked.
    rounding: str = None
    streams: int = 0  # operands that must be read with 16-byte vector loads (0: not a streaming check)
    divisible: tuple = field(default_factory=tuple)  # int params specialized as multiples of 16


def _variants(op):
    """[Variant] for one op: every launch configuration its host functions can choose."""
    if op == "pgd_step":
        from . import pgd_step as k
        out = []
        for dt in STORAGE:
            p = f"*{dt}"
            img = dict(x_adv_ptr=p, grad_ptr=p, x_nat_ptr=p, out_ptr=p)
            out += [
                Variant(k._pgd_step_linf_kernel, {**img, "n_elements": "i32", "alpha": "fp32", "eps": "fp32"},
                        dict(BLOCK=k.LINF_BLOCK), dict(num_warps=4, **k.NO_FMA), no_fma=True, rounding="ieee",
                        streams=3, divisible=("n_elements",)),
                # The fp32 noise is the widest stream; x_nat in 16-bit needs only 8-byte loads per 4
                # elements, which the v4-count check below does not require of it.
                Variant(k._pgd_random_init_linf_kernel,
                        dict(x_nat_ptr=p, noise_ptr="*fp32", out_ptr=p, n_elements="i32", eps="fp32"),
                        dict(BLOCK=k.LINF_BLOCK), dict(num_warps=4, **k.NO_FMA), no_fma=True, rounding="ieee",
                        streams=2 if dt == "fp32" else 1, divisible=("n_elements",)),
            ]
            for block, one_pass in ((4096, True), (16, True), (k.L2_STREAM_BLOCK, False)):
                streaming = block >= 1024
                out += [
                    Variant(k._pgd_step_l2_kernel,
                            {**img, "row_numel": "i32", "alpha": "fp32", "eps": "fp32", "grad_eps": "fp32"},
                            dict(BLOCK=block, ONE_PASS=one_pass), dict(num_warps=8 if block >= 2048 else 4),
                            rounding="ieee", streams=3 if streaming else 0, divisible=("row_numel",)),
                    Variant(k._pgd_random_init_l2_kernel,
                            dict(x_nat_ptr=p, noise_ptr="*fp32", radius_ptr="*fp32", out_ptr=p, row_numel="i32",
                                 eps="fp32"),
                            dict(BLOCK=block, ONE_PASS=one_pass), dict(num_warps=8 if block >= 2048 else 4),
                            rounding="ieee",
                            streams=(2 if dt == "fp32" else 1) if streaming else 0, divisible=("row_numel",)),
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
                    Variant(k._lsc_loss_fwd_kernel,
                            dict(logits_ptr=p, target_ptr="*i64", loss_ptr="*fp32", mask_ptr="*i1", lse_ptr="*fp32",
                                 n_cols="i32", p="fp32", q="fp32"), dict(BLOCK=block), nw, rounding="lsc"),
                    Variant(k._lsc_loss_bwd_kernel,
                            dict(grad_out_ptr="*fp32", logits_ptr=p, target_ptr="*i64", lse_ptr="*fp32",
                                 mask_ptr="*i1", dlogits_ptr=p, n_cols="i32", batch="fp32"), dict(BLOCK=block), nw,
                            rounding="lsc"),
                    Variant(k._lsc_loss_trades_fwd_kernel,
                            dict(nat_ptr=p, adv_ptr=p, target_ptr="*i64", loss_ptr="*fp32", mask_ptr="*i1",
                                 lse_nat_ptr="*fp32", lse_adv_ptr="*fp32", kl_ptr="*fp32", n_cols="i32",
                                 beta="fp32", p="fp32", q="fp32"),
                            dict(BLOCK=block), nw, rounding="lsc"),
                    Variant(k._lsc_loss_trades_bwd_kernel,
                            dict(grad_out_ptr="*fp32", nat_ptr=p, adv_ptr=p, target_ptr="*i64", lse_nat_ptr="*fp32",
                                 lse_adv_ptr="*fp32", kl_ptr="*fp32", mask_ptr="*i1", d_nat_ptr=p, d_adv_ptr=p,
                                 n_cols="i32", batch="fp32", beta="fp32"), dict(BLOCK=block), nw, rounding="lsc"),
                ]
        for block in (16, k.REDUCE_BLOCK):
            out.append(Variant(k._lsc_masked_sum_kernel,
                               dict(loss_ptr="*fp32", mask_ptr="*i1", count_ptr="*i64", masked_mean_ptr="*fp32",
                                    batch="i32", batch_f="fp32"), dict(BLOCK=block),
                               dict(num_warps=4 if block >= 512 else 1), rounding="ieee"))
        return out
    if op == "weight_perturb":
        from . import weight_perturb as k
        table = dict(chunk_seg_ptr="*i32", chunk_start_ptr="*i64", offsets_ptr="*i64")
        out = [Variant(k._segment_sum_kernel, dict(partial_ptr="*fp32", seg_chunk_start_ptr="*i32", out_ptr="*fp32"),
                       dict(BLOCK=k.REDUCE_BLOCK), dict(num_warps=1), rounding="ieee")]
        for dt in STORAGE:
            p = f"*{dt}"
            # ALIGN=16: the table of every real model (offsets are multiples of 8 elements, and
            # SegmentTable caps align at 16); ALIGN=1: a table with an odd segment, scalar but correct.
            for chunk, align in ((64, 1), (4096, 1), (4096, 16)):
                nw = dict(num_warps=k._num_warps(chunk))
                streaming = chunk == 4096 and align == 16
                tc = dict(CHUNK=chunk, ALIGN=align)
                out += [
                    Variant(k._segment_sq_norm_partial_kernel, dict(x_ptr=p, **table, partial_ptr="*fp32"),
                            tc, nw, rounding="ieee", streams=1 if streaming else 0),
                    Variant(k._accumulate_sq_norm_partial_kernel,
                            dict(a_ptr=p, g_ptr=p, beta_ptr="*fp32", **table, partial_ptr="*fp32"),
                            {**tc, "HAS_BETA": True}, {**nw, **k.NO_FMA}, no_fma=True, rounding="ieee",
                            streams=2 if streaming else 0),
                    Variant(k._accumulate_sq_norm_partial_kernel,
                            dict(a_ptr=p, g_ptr=p, beta_ptr=p, **table, partial_ptr="*fp32"),
                            {**tc, "HAS_BETA": False}, {**nw, **k.NO_FMA}, no_fma=True, rounding="ieee",
                            streams=2 if streaming else 0),
                ]
                for sign in (1, -1):
                    out.append(Variant(k._perturb_axpy_kernel, dict(w_ptr=p, a_ptr=p, scale_ptr="*fp32", **table),
                                       {**tc, "SIGN": sign}, {**nw, **k.NO_FMA}, no_fma=True, rounding="ieee",
                                       streams=2 if streaming else 0))
        return out
    raise ValueError(f"op: expected pgd_step, lsc_loss or weight_perturb, got {op!r}")


def _cuobjdump():
    """Triton's bundled cuobjdump (any CUDA toolkit's works too), or None."""
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for path in (bundled, os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")):
        if os.path.exists(path):
            return path
    return None


def resource_usage(cubin_bytes, cuobjdump):
    """{'REG': n, 'STACK': n, 'LOCAL': n, ...} of the single kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin_bytes)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


# A 16-byte vector load (ld.global.v4.b32 / .v4.f32, with or without cache modifiers) and a scalar one.
_VEC_LOAD = re.compile(r"ld\.global(?:\.[a-z0-9_]+)*?\.v4\.(?:b32|f32|u32)")
_SCALAR_LOAD = re.compile(r"ld\.global(?:\.(?:nc|ca|cg|cs|lu|cv|L1::\w+|L2::\w+))*\.(?:b|f|u|s)(?:8|16|32|64)\b")
# min.f32 / max.f32 without .NaN: the NaN-dropping forms.
_NAN_DROPPING_MINMAX = re.compile(r"\b(?:min|max)(?:\.ftz)?\.f32\b")


def ptx_findings(v, ptx):
    """Failure messages for the PTX of one variant (rounding and vectorization rules above)."""
    bad = []
    if v.no_fma and "fma.rn.f32" in ptx:
        bad.append("contains fma.rn.f32 although launched with NO_FMA")
    if v.rounding is not None:
        approx = sorted(set(re.findall(r"\b[a-z0-9]+(?:\.[a-z0-9]+)*?\.approx\b", ptx)))
        if v.rounding == "lsc":
            approx = [a for a in approx if not a.startswith(LSC_APPROX_OK)]
        if approx:
            bad.append(f"approximate instructions {approx} in a kernel that must round like the reference")
        if "div.full" in ptx:
            bad.append("div.full (2-ulp division) instead of div.rn: use tl.div_rn")
    if v.rounding == "ieee" and _NAN_DROPPING_MINMAX.search(ptx):
        bad.append("min.f32/max.f32 drop NaN where torch.clamp keeps it: use propagate_nan=tl.PropagateNan.ALL")
    if v.streams:
        n_vec, n_scalar = len(_VEC_LOAD.findall(ptx)), len(_SCALAR_LOAD.findall(ptx))
        if n_vec < v.streams or n_scalar > MAX_SCALAR_LOADS:
            bad.append(f"not vectorized: {n_vec} ld.global.v4 for {v.streams} streamed operand(s), "
                       f"{n_scalar} scalar ld.global (at most {MAX_SCALAR_LOADS})")
    return bad


def check(ops, arch=90):
    """Compile every variant of `ops` for sm_`arch`; returns a list of failure messages."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    cuobjdump = _cuobjdump()
    failures = []
    if cuobjdump is None:
        failures.append("cuobjdump not found (triton's bundled one or $CUDA_HOME/bin): cannot read registers")
    for op in ops:
        for v in _variants(op):
            name = f"{op}.{v.kernel.fn.__name__}{v.signature[next(iter(v.signature))]}{v.constexprs}"
            names = v.kernel.arg_names
            # What the launcher specializes: 16-byte aligned base pointers, the listed ints ≡ 0 mod 16.
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, ty in v.signature.items()
                     if ty.startswith("*") or a in v.divisible}
            try:
                src = ASTSource(fn=v.kernel, signature={**v.signature, **dict.fromkeys(v.constexprs, "constexpr")},
                                constexprs=v.constexprs, attrs=attrs)
                compiled = triton.compile(src, target=target, options=v.options)
            except Exception as exc:  # noqa: BLE001  report every failing variant, not just the first
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:1500]}")
                continue
            failures += [f"{name}: {msg}" for msg in ptx_findings(v, compiled.asm["ptx"])]
            if cuobjdump is not None:
                use = resource_usage(compiled.asm["cubin"], cuobjdump)
                if use.get("LOCAL", 0) or use.get("STACK", 0):
                    failures.append(f"{name}: local memory (spills): {use}")
                if v.streams and use.get("REG", 0) > MAX_REGS:
                    failures.append(f"{name}: {use['REG']} registers per thread, more than {MAX_REGS}")
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
