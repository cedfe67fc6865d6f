"""The one table of tolerances for the fused ops against their reference, used by ``rwp-fast verify`` and
by the op tests (tests/test_pgd_step.py, test_lsc_loss.py, test_weight_perturb.py import from here).

Each tolerance says why it is that size. Three kinds:
  * ``exact``: the backend runs the same fp32 operations in the same order as the reference and rounds
    once on store, so the bits must be equal (NaN where the reference has NaN);
  * ``close``: |got − ref| ≤ atol + rtol·|ref| elementwise;
  * ``ulps`` (may be combined with close): |got − ref| ≤ k units in the last place of the output dtype
    at |ref|. A value passes if it meets either bound. Used where an fp32 result that agrees to ~1e-6 is
    rounded to bf16/fp16: two fp32 values that close can round to neighbouring bf16 values.
In every kind, NaN and ±inf must sit exactly where the reference has them.
"""

import dataclasses
import math

import torch

FP32_ULP_AT_1 = 2.0 ** -23  # spacing of fp32 just above 1.0: 1.2e-7


@dataclasses.dataclass(frozen=True)
class Tol:
    kind: str  # "exact" or "close"
    atol: float = 0.0
    rtol: float = 0.0
    ulps: float | None = None
    why: str = ""

    def describe(self):
        if self.kind == "exact":
            return "bit-exact"
        parts = []
        if self.atol or self.rtol or self.ulps is None:
            parts.append(f"atol {self.atol:.1e} rtol {self.rtol:.1e}")
        if self.ulps is not None:
            parts.append(f"{self.ulps:g} ulp")
        return " or ".join(parts)


def exact(why):
    return Tol("exact", why=why)


def close(atol=0.0, rtol=0.0, ulps=None, why=""):
    return Tol("close", atol=atol, rtol=rtol, ulps=ulps, why=why)


def low_precision(dtype):
    return dtype in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------- pgd_step
# L2 step: ‖g‖ and ‖δ'‖ are fp32 sums of ≤ 7K squares in another order than torch's: a relative
# difference of ~1e-6 at most; it scales |δ| ≤ ε < 1, so the output differs by < 1e-6, plus one fp32
# ulp of the final x_nat + δ (6e-8 below 1).
PGD_L2_ATOL = 1e-6


def pgd_step(norm, backend, dtype, function="step"):
    """Tolerance of pgd_step's output (function 'step' or 'random_init') for one norm."""
    lp = low_precision(dtype)
    if function == "step" and norm == "linf":
        return exact("same fp32 ops in the same order as pgd_step_ref (x + α·sign(g) − x_nat, clamp ±ε, "
                     "clamp [0, 1]), rounded once on store")
    if function == "random_init" and norm == "linf":
        if backend != "cuda":
            return exact("x + ε·noise: Triton launches with FMA contraction off, so it rounds twice as torch")
        return close(atol=FP32_ULP_AT_1, ulps=1 if lp else None,
                     why="CUDA may fuse x + ε·noise into one FMA: 1 fp32 ulp near 1 (1.2e-7)"
                         + (", or 1 ulp of the dtype after the cast" if lp else ""))
    why = ("‖·‖ summed in another order: ~1e-6 relative on |δ| < 1, plus 1 fp32 ulp of x_nat + δ")
    if lp:
        why += "; the fp32 results, 1e-6 apart, may round to neighbouring values of the dtype: 1 ulp"
    return close(atol=PGD_L2_ATOL, ulps=1 if lp else None, why=why)


# ----------------------------------------------------------------------------------------- lsc_loss
# Per-example CE: lse summed over C exp terms in another order (tree vs torch's), plus a differently
# rounded subtraction: a few ulps of lse ≤ ~12 (ulp 1e-6), so atol 5e-6 with rtol 1e-5. On a GPU the
# Triton kernels use the hardware exp/log (≤ 2 ulp, plus |z − max|·2⁻²⁴ relative from rounding the exp
# argument; kernels/lsc_loss.py): for |z − max| ≤ 20 that is ≤ 22 ulp of one term, ~1.3e-6, inside rtol 1e-5.
LSC_LOSS_TOL = {"rtol": 1e-5, "atol": 5e-6}
# TRADES: β·KL multiplies the KL's own few-ulp error by β = 6: atol 3e-5.
LSC_TRADES_LOSS_TOL = {"rtol": 1e-5, "atol": 3e-5}
# Gradients: softmax via exp(z − lse) vs torch's exp(log_softmax): relative error ≈ ulp(lse)·few
# ≈ 2e-6, on values ≤ grad_out/B; atol covers probabilities that underflow differently near 1e-38.
LSC_GRAD_TOL = {"rtol": 2e-5, "atol": 1e-8}
LSC_TRADES_GRAD_TOL = {"rtol": 2e-5, "atol": 1e-7}
TRADES_BETA_FOR_TOL = 6.0  # the β of the checks (SPEC.md: TRADES β = 6)
# A loss within this distance of p or q may land on either side of the threshold (loss tolerance ×20).
LSC_MASK_NEAR = 1e-4
# Lanes of the longest sequential chain in the lse sum: the CUDA kernel's warp (⌈C/32⌉ terms a lane,
# then a 5-level butterfly); the Triton kernel's chain is shorter (⌈C/1024⌉ blocks, a 10-level tree).
LSC_LSE_LANES = 32


def lse_chain_bound(classes):
    """Worst-case relative error of the lse's Σ exp over `classes` terms (= absolute error of lse, and
    relative error of each softmax term): one fp32 rounding (2⁻²⁴) per addition on the longest chain,
    ⌈C/32⌉ + 5. C = 10: 37·2⁻²⁴ = 2.2e-6, under the fixed bounds above; C = 2²⁰ + 7: 2.0e-3, where an H200
    measured 2.7e-5 (bench/results/2026-12-04-h200), above the fixed 2e-5 that assumes few terms."""
    return (math.ceil(classes / LSC_LSE_LANES) + 5) * 2.0 ** -24


def lsc_loss(output, dtype, trades=False, zmax=0.0, classes=1):
    """Tolerance for one output of lsc_loss: 'loss', 'mean', 'grad', 'mask' or 'count'.

    classes: C, the length of the lse reduction (lse_chain_bound).
    zmax: the largest finite |logit| of the inputs. ℓ = lse − z_y cancels: its rounding error is a few
    ulps of |z|, not of ℓ, so with huge logits (1e4: fp32 ulp 1e-3) the bounds grow to 8 ulps of zmax
    (×β for TRADES); below |z| ≈ 10 the fixed bounds, sized for lse ≤ ~12, are the larger ones.
    """
    scaled = 8 * FP32_ULP_AT_1 * zmax * (TRADES_BETA_FOR_TOL if trades else 1.0)
    if output in ("mask", "count"):
        return exact("the mask is p ≤ ℓ < q on the backend's own loss; compared where the reference loss is "
                     f"more than {LSC_MASK_NEAR:g} from p and q (elsewhere either side is right)")
    if output in ("loss", "mean"):
        tol = dict(LSC_TRADES_LOSS_TOL if trades else LSC_LOSS_TOL)
        why = ("lse over C terms summed in another order: a few ulps of lse ≤ ~12"
               + ("; β = 6 multiplies the KL's error" if trades else "") + "; fp32 math at any input dtype")
        if scaled > tol["atol"]:
            tol["atol"] = scaled
            why += f"; huge logits: 8 ulps of max|z| = {zmax:.3g}"
        # TRADES: ℓ = CE + β·KL and KL = Σ p_nat(z_nat − z_adv) − lse_nat + lse_adv, so (1 + 2β) lse errors
        chain = lse_chain_bound(classes) * (1 + (2 * TRADES_BETA_FOR_TOL if trades else 0.0))
        if chain > tol["atol"]:
            tol["atol"] = chain
            why += f"; C = {classes}: the lse sum's worst case, {chain:.1e} absolute"
        return close(**tol, why=why)
    tol = dict(LSC_TRADES_GRAD_TOL if trades else LSC_GRAD_TOL)
    lp = low_precision(dtype)
    why = "softmax as exp(z − lse) vs torch's exp(log_softmax): a few ulps of lse relative"
    if scaled > tol["rtol"]:
        tol["rtol"] = scaled
        why += f"; huge logits: z − lse is off by 8 ulps of max|z| = {zmax:.3g}, relative on exp()"
    chain = lse_chain_bound(classes)
    if chain > tol["rtol"]:
        tol["rtol"] = chain
        why += f"; C = {classes}: the lse sum's worst case {chain:.1e}, relative on every softmax term"
    if lp:
        why += "; rounded once to the logits' dtype: 1 ulp"
    return close(**tol, ulps=1 if lp else None, why=why)


# ----------------------------------------------------------------------------------- weight_perturb
# Norms: fp32 partial sums over ≤ 4096 elements, then a sum of chunk partials, against the reference's
# fp64 accumulation: relative error ≲ log2(n)·2⁻²⁴ ≈ 1e-6 for tree sums; rtol 1e-5 leaves 10×.
NORM_TOL = {"rtol": 1e-5, "atol": 0}


def segment_norm(chunk=4096, max_chunks_per_segment=1):
    """Squared segment norms: the worst case of a tree sum within a chunk (log2(chunk) roundings) and a
    sequential sum of the chunk partials (one rounding each), 2⁻²⁴ per rounding; never below 1e-5."""
    bound = (math.log2(chunk) + max_chunks_per_segment) * 2.0 ** -24
    rtol = max(NORM_TOL["rtol"], bound)
    return close(rtol=rtol, why=f"fp32 sums vs the fp64 reference: ≤ (log2 {chunk} + {max_chunks_per_segment} "
                                f"chunk partials)·2⁻²⁴ = {bound:.1e} relative worst case; at least 1e-5")


def elementwise(function, backend, dtype):
    """a ← β·a + g ('accumulate') and w ± s·a ('axpy')."""
    lp = low_precision(dtype)
    if function == "axpy" and (backend != "cuda" or not lp):
        return exact("w ± s_l·a: same fp32 product and sum as perturb_axpy_ref, rounded once on store")
    if function == "accumulate" and backend != "cuda":
        return exact("β·a + g: Triton launches with FMA contraction off, so it rounds as torch does")
    return close(rtol=1e-6 if not lp else 0.0, atol=1e-6 if not lp else 0.0, ulps=1 if lp else None,
                 why="CUDA may fuse β·a + g into one FMA: one rounding instead of two, 1 ulp of the result")


SCALE = exact("perturb_scale is the same O(L) torch code on every backend")

# ----------------------------------------------------------------------------------- whole step
# Fast vs reference training step, fp32, TF32 off, from the same weights: the paths differ only by the
# in-place (w + s·a) − s·a + s'·a and the reduction order of norms and losses, a few ulps of w per RWP
# iteration. Measured below 1e-6 relative on CPU; 1e-5 leaves 10× while every planted bug tried (BN stats
# not restored, v removed twice, mean over the mask count) moves the weights by 1e-4 or more.
STEP_RTOL = 1e-5
STEP = close(rtol=STEP_RTOL, why="same fp32 math up to in-place w ± s·a and reduction order; planted bugs "
                                 "move the weights by ≥ 1e-4")


# ------------------------------------------------------------------------------------ error metrics
_MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}
_MIN_EXP = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126, torch.float64: -1022}


def ulp(ref, dtype):
    """Spacing of `dtype` at |ref| (fp64 tensor), subnormal spacing at 0."""
    m, emin = _MANTISSA.get(dtype, 23), _MIN_EXP.get(dtype, -126)
    a = ref.abs()
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))  # a = f·2^e, f in [0.5, 1)
    e = torch.clamp(e - 1, min=emin)
    return torch.ldexp(torch.ones_like(a), e - m)


def compare(got, ref, tol, dtype=None):
    """Errors of `got` against `ref` under `tol`: dict(ok, worst_abs, worst_rel, worst_ulp, n, reason)."""
    dtype = dtype or got.dtype
    if got.shape != ref.shape:
        return dict(ok=False, worst_abs=None, worst_rel=None, worst_ulp=None, n=ref.numel(),
                    reason=f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.dtype == torch.bool or not got.is_floating_point():
        diff = (got != ref).sum().item()
        return dict(ok=diff == 0, worst_abs=float(diff > 0), worst_rel=None, worst_ulp=None, n=ref.numel(),
                    reason=f"{diff} of {ref.numel()} differ" if diff else "")
    g, r = got.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    g_nan, r_nan = torch.isnan(g), torch.isnan(r)
    special = torch.isinf(r) | torch.isinf(g)
    reasons = []
    if not torch.equal(g_nan, r_nan):
        reasons.append(f"NaN at {int((g_nan & ~r_nan).sum())} places the reference is not, "
                       f"missing at {int((r_nan & ~g_nan).sum())}")
    both_inf = special & ~g_nan & ~r_nan
    if not torch.equal(g[both_inf], r[both_inf]):
        reasons.append("±inf where the reference differs")
    finite = ~(g_nan | r_nan | special)
    d = (g[finite] - r[finite]).abs()
    rf = r[finite]
    if d.numel():
        worst_abs = d.max().item()
        rel = d / rf.abs().clamp_min(torch.finfo(torch.float64).tiny)
        worst_rel = rel.max().item()
        u = d / ulp(rf, dtype)
        worst_ulp = u.max().item()
        if tol.kind == "exact":
            bad = d > 0
        else:
            bad = d > tol.atol + tol.rtol * rf.abs()
            if tol.ulps is not None:
                bad &= u > tol.ulps
        if bad.any():
            reasons.append(f"{int(bad.sum())} of {d.numel()} elements outside {tol.describe()}")
    else:
        worst_abs = worst_rel = worst_ulp = 0.0
    return dict(ok=not reasons, worst_abs=worst_abs, worst_rel=worst_rel, worst_ulp=worst_ulp, n=ref.numel(),
                reason="; ".join(reasons))


# ------------------------------------------------------------------------------- known deviations
# (op, function, family, output) → why. Reported as KNOWN, not PASS: the backend differs from the reference
# there on purpose or by an open defect; ``rwp-fast verify --strict`` counts them as FAIL. Remove an entry
# when the backends match the reference again (verify then says "KNOWN entry no longer needed").
KNOWN = {}
