"""The op checks of ``rwp-fast verify``: every fused op × backend × dtype against the reference.

Each check function takes a ``Ctx`` and yields ``(function, family, shape, output, got, ref, tol)``; the
runner compares, aggregates and times them. The backend function a check calls is looked up at call time
(``rwp_fast.ops`` → ``dispatch.backend_module``), so a test that monkeypatches it proves that verify
catches the planted bug.
"""

import dataclasses
import math

import torch

from .. import ops
from ..reference.lsc_loss import lsc_loss_ref, lsc_loss_trades_ref, lsc_mask_ref
from ..reference.pgd_step import pgd_random_init_ref, pgd_step_ref
from ..reference.weight_perturb import (accumulate_sq_norm_ref, perturb_axpy_ref, perturb_scale_ref,
                                        segment_sq_norm_ref)
from . import tolerances as T

PRIME = 2 ** 20 + 7  # 1048583, the smallest prime above 2^20: no block or chunk size divides it
ODD = (1, 3, 127)
EPS = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 15 / 255)}  # (ε, α), SPEC.md §1, CIFAR-10
TRADES_BETA = 6.0
HUGE = {torch.float32: 1e4, torch.bfloat16: 1e4, torch.float16: 3e4}  # logits near the dtype's top


@dataclasses.dataclass
class Ctx:
    device: torch.device
    backend: str
    dtype: torch.dtype
    big: bool                 # include the prime > 2^20 shapes
    small: bool               # CPU / --quick sizes
    model_numels: list | None  # the user's model's segment sizes (--model), or None
    model_name: str | None
    seed: int = 0
    families: list | None = None  # only families whose name contains one of these words

    def wants(self, family):
        return not self.families or any(f in family for f in self.families)

    def gen(self, salt):
        return torch.Generator(device="cpu").manual_seed(self.seed * 1000003 + salt)

    def rand(self, shape, salt, kind="rand"):
        g = self.gen(salt)
        t = torch.rand(shape, generator=g) if kind == "rand" else torch.randn(shape, generator=g)
        return t.to(self.device)


def _nan_like(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------- pgd_step
def _pgd_shapes(ctx):
    random = [(7, 3, 8, 8), (33, 5)] if ctx.small else [(128, 3, 32, 32), (7, 3, 48, 48)]
    odd = [(n, n) for n in ODD] + ([(1, PRIME)] if ctx.big else [])
    return {"random": random, "odd sizes": odd, "special values": [(9, 3, 4, 4)], "eps=0": [(7, 3, 4, 4)]}


def _pgd_inputs(ctx, shape, family, norm, salt):
    eps = 0.0 if family == "eps=0" else EPS[norm][0]
    x_nat = ctx.rand(shape, salt)
    x_nat.view(-1)[::11] = 0.0   # saturated pixels: the [0, 1] clamp binds
    x_nat.view(-1)[5::13] = 1.0
    x_adv = (x_nat + (ctx.rand(shape, salt + 1) * 2 - 1) * (eps or EPS[norm][0])).clamp(0, 1)
    grad = ctx.rand(shape, salt + 2, "randn")
    grad[ctx.rand(shape, salt + 3) < 0.1] = 0.0  # sign(0) = 0
    grad.view(-1)[1::17] = -0.0
    if family == "special values":
        flat = grad.view(shape[0], -1)
        flat[0] = 0.0                 # an all-zero gradient row (L2: 0/(0 + 1e-10) = 0)
        flat[1, 0] = float("nan")     # NaN and ±inf: the reference's NaN behaviour is the spec
        flat[2, 1] = float("inf")
        flat[3, 2] = -float("inf")
        flat[4] = 1e30                # huge but finite
        x_adv.view(shape[0], -1)[5] = x_nat.view(shape[0], -1)[5]  # δ = 0
    return x_adv.to(ctx.dtype), grad.to(ctx.dtype), x_nat.to(ctx.dtype), eps


def pgd_step_checks(ctx):
    for family, shapes in _pgd_shapes(ctx).items():
        if not ctx.wants(family):
            continue
        for i, shape in enumerate(shapes):
            for norm in ("linf", "l2"):
                x_adv, grad, x_nat, eps = _pgd_inputs(ctx, shape, family, norm, 10 * i)
                alpha = EPS[norm][1]
                ref = pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm)
                tol = T.pgd_step(norm, ctx.backend, ctx.dtype, "step")
                got = ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out=_nan_like(x_adv), backend=ctx.backend)
                yield f"step {norm}", family, shape, "out", got, ref, tol
                inplace = x_adv.clone()
                ops.pgd_step_(inplace, grad, x_nat, alpha, eps, norm, backend=ctx.backend)
                yield f"step {norm}", family, shape, "in place", inplace, ref, tol
                if family == "special values":
                    continue
                if norm == "linf":
                    noise, radius = ctx.rand(shape, 10 * i + 5) * 2 - 1, None
                else:
                    noise, radius = ctx.rand(shape, 10 * i + 5, "randn"), ctx.rand(shape[0], 10 * i + 6)
                ref = pgd_random_init_ref(x_nat, noise, eps, norm, radius)
                got = ops.pgd_random_init(x_nat, noise, eps, norm, radius, backend=ctx.backend)
                yield f"random start {norm}", family, shape, "out", got, ref, T.pgd_step(
                    norm, ctx.backend, ctx.dtype, "random_init")


# --------------------------------------------------------------------------------------------- lsc_loss
def _lsc_sizes(ctx):
    random = [(7, 10), (33, 100)] if ctx.small else [(128, 10), (128, 100), (64, 1000)]
    odd = [(n, n) for n in ODD] + ([(1, PRIME)] if ctx.big else [])
    return {"random": random, "odd sizes": odd, "special values": [(12, 10)], "NaN/inf": [(12, 10)],
            "mask empty": [(7, 10)], "mask boundary": [(7, 10)]}


def _lsc_logits(ctx, b, c, family, salt):
    z = ctx.rand((b, c), salt, "randn") * 3
    if family in ("special values", "mask boundary"):
        z[0] = 0.0                          # equal logits: CE = log C exactly, the same value in each row
        z[1] = 0.0
    if family == "special values":
        z[2] = z[2] * HUGE[ctx.dtype] / 3   # huge logits: lse must not overflow
        z[6, :] = HUGE[ctx.dtype]           # huge and equal
    if family == "NaN/inf":                 # the reference's NaN behaviour is the spec
        z[3, 1] = float("nan")
        z[4, 2] = float("inf")
        z[5] = -float("inf")
        z[5, 0] = 0.0
    target = torch.randint(0, c, (b,), generator=ctx.gen(salt + 1)).to(ctx.device)
    return z.to(ctx.dtype), target


def _ranges(ctx, family, ref_loss):
    if family == "mask empty":
        return [(0.0, 0.0)]
    if family == "mask boundary":
        # q equal to a loss exactly (rows 0, 1): p ≤ ℓ < q masks them out, p = that loss keeps them
        q = float(ref_loss[0])
        return [(0.0, q), (q, math.inf)]
    finite = ref_loss[torch.isfinite(ref_loss)]
    median = float(finite.median()) if finite.numel() else 1.0
    return [(0.0, math.inf), (0.5 * median, 1.5 * median)]  # the full mask (AWP), and a mixed one


def _fwd_bwd(fn, leaves, rest, grad_out=0.7):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, *rest)
    (out[0] * grad_out).backward()
    return out, [leaf.grad for leaf in leaves]


def lsc_loss_checks(ctx):
    for family, sizes in _lsc_sizes(ctx).items():
        if not ctx.wants(family):
            continue
        for i, (b, c) in enumerate(sizes):
            z, target = _lsc_logits(ctx, b, c, family, 20 * i)
            z_adv = (z.float() + ctx.rand((b, c), 20 * i + 7, "randn")).to(ctx.dtype)
            for trades in (False, True):
                name = "trades" if trades else "ce"
                ref_fn = (lambda zn, za, t, p, q: lsc_loss_trades_ref(zn, za, t, TRADES_BETA, p, q)) if trades \
                    else lsc_loss_ref
                op_fn = (lambda zn, za, t, p, q: ops.lsc_loss_trades(zn, za, t, TRADES_BETA, p, q,
                                                                     backend=ctx.backend)) if trades \
                    else (lambda zn, t, p, q: ops.lsc_loss(zn, t, p, q, backend=ctx.backend))
                leaves = [z, z_adv] if trades else [z]
                full_loss = ref_fn(*leaves, target, 0.0, math.inf)[1]
                finite = torch.cat([t.float()[torch.isfinite(t.float())] for t in leaves])
                zmax = float(finite.abs().max()) if finite.numel() else 0.0
                for p, q in _ranges(ctx, family, full_loss):
                    (r_mean, r_loss, r_mask, r_count), r_grads = _fwd_bwd(ref_fn, leaves, (target, p, q))
                    (mean, loss, mask, count), grads = _fwd_bwd(op_fn, leaves, (target, p, q))
                    shape = (b, c)

                    def tol(output):
                        return T.lsc_loss(output, ctx.dtype, trades, zmax, classes=c)
                    yield name, family, shape, "loss", loss, r_loss, tol("loss")
                    yield name, family, shape, "mean", mean, r_mean, tol("mean")
                    # the mask is the backend's own loss thresholded, exactly (catches ≤ for <) ...
                    yield name, family, shape, "mask vs own loss", mask, lsc_mask_ref(loss, p, q), \
                        T.lsc_loss("mask", ctx.dtype)
                    # ... and the reference's mask wherever the reference loss is not within reach of p, q
                    far = ((r_loss - p).abs() >= T.LSC_MASK_NEAR) & ((r_loss - q).abs() >= T.LSC_MASK_NEAR)
                    far &= ~torch.isnan(r_loss)
                    yield name, family, shape, "mask", mask[far], r_mask[far], T.lsc_loss("mask", ctx.dtype)
                    yield name, family, shape, "count", count.view(1), mask.sum().view(1), \
                        T.lsc_loss("count", ctx.dtype)
                    for k, (g, rg) in enumerate(zip(grads, r_grads)):
                        out = "grad" if not trades else ("grad nat", "grad adv")[k]
                        yield name, family, shape, out, g, rg, tol("grad")


# ----------------------------------------------------------------------------------------- weight_perturb
def _tables(ctx):
    g = ctx.gen(99)
    n_rand = 6 if ctx.small else 20
    hi = 300 if ctx.small else 70000
    random = torch.randint(1, hi, (n_rand,), generator=g).tolist()
    odd = list(ODD) + ([PRIME] if ctx.big else [])
    tables = {"random": [(random, 4096), (random, 64)], "odd sizes": [(odd, 4096), (odd, 64)],
              "special values": [([5, 64, 1, 300], 64)]}
    if ctx.model_numels:
        tables[f"model {ctx.model_name}"] = [(ctx.model_numels, ops.weight_perturb.DEFAULT_CHUNK)]
    return tables


def weight_perturb_checks(ctx):
    from ..ops.weight_perturb import SegmentTable
    dt = ctx.dtype
    for family, layouts in _tables(ctx).items():
        if not ctx.wants(family):
            continue
        for i, (numels, chunk) in enumerate(layouts):
            table = SegmentTable.from_numels(numels, chunk).to(ctx.device)
            n, L = table.numel, table.num_segments
            shape = f"L={L} N={n} chunk={chunk}"
            w = (ctx.rand(n, 30 * i, "randn") * 0.05).to(dt)
            a = ctx.rand(n, 30 * i + 1, "randn").to(dt)
            gr = ctx.rand(n, 30 * i + 2, "randn").to(dt)
            if family == "special values":
                a[5:69] = 0.0              # an all-zero segment: ‖a_l‖ = 0, s = γ‖w‖/1e-20
                gr[5:69] = 0.0
                gr[0] = float("nan")       # NaN propagates into a and its norm, as in the reference
                gr[70] = float("inf")
            scale = ctx.rand(L, 30 * i + 3) * 1e-2
            if family == "special values":
                scale[0] = 0.0             # γ = 0: w ± 0·a leaves w exactly
            max_chunks = max(-(-k // chunk) for k in numels)
            norm_tol = T.segment_norm(chunk, max_chunks)
            yield "segment_sq_norm", family, shape, "sq", ops.segment_sq_norm(w, table, backend=ctx.backend), \
                segment_sq_norm_ref(w, table.offset_list), norm_tol
            for beta in (None, ctx.rand(L, 30 * i + 4) * 2):
                label = "accumulate_sq_norm_" + (" β" if beta is not None else "")
                a_ref, sq_ref = accumulate_sq_norm_ref(a, gr, table.offset_list, beta)
                a_got = a.clone()
                sq = ops.accumulate_sq_norm_(a_got, gr, table, beta, backend=ctx.backend)
                yield label, family, shape, "a", a_got, a_ref, T.elementwise("accumulate", ctx.backend, dt)
                yield label, family, shape, "sq", sq, sq_ref, norm_tol
            for sign in (1, -1):
                ref = perturb_axpy_ref(w, a, scale, table.offset_list, sign)
                got = w.clone()
                ops.perturb_axpy_(got, a, scale, table, sign, backend=ctx.backend)
                yield f"perturb_axpy_ {sign:+d}", family, shape, "w", got, ref, T.elementwise("axpy", ctx.backend, dt)
            w_sq, a_sq = segment_sq_norm_ref(w, table.offset_list), segment_sq_norm_ref(a, table.offset_list)
            for scope in ("layer", "global"):
                yield f"perturb_scale {scope}", family, shape, "s", ops.perturb_scale(w_sq, a_sq, 0.01, scope), \
                    perturb_scale_ref(w_sq, a_sq, 0.01, scope), T.SCALE


CHECKS = {"pgd_step": pgd_step_checks, "lsc_loss": lsc_loss_checks, "weight_perturb": weight_perturb_checks}
