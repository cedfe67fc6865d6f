"""Reference for the fused op ``weight_perturb``: segmented norms, γ‖w‖ rescale and w ± v.

SPEC.md §2. The perturbed weights (conv and linear ``*weight`` tensors with dim > 1) are seen as
segments of one flat 1-D buffer; ``offsets`` is an int64 tensor of shape (L + 1,) with
offsets[0] = 0 and offsets[l + 1] − offsets[l] = numel of tensor l (≥ 1). Every backend implements the
four functions below over that layout with a number of launches that does not depend on L.

One RWP iteration of the fast path is, with direction buffer a and current scale s (v = s·a):

    w ← w − s_old·a                        perturb_axpy(w, a, s_old, sign=-1)
    a ← β·a + g,  ‖a_l‖²                   accumulate_sq_norm(a, g, beta)     β = 1 (accumulate) or s_old (paper)
    s_new = γ‖w_l‖ / (‖a_l‖ + 1e-20)        perturb_scale(w_sq, a_sq, gamma, scope)
    w ← w + s_new·a                        perturb_axpy(w, a, s_new, sign=+1)

Reductions and elementwise arithmetic are in the accumulator dtype max(fp32, buffer dtype)
(``rwp_fast.core.accumulate_dtype``): fp32 for fp16/bf16/fp32 buffers, fp64 for fp64; cast back on store.
"""

import torch

from ..core import NORM_SCOPES, SCALE_EPS, accumulate_dtype, upcast  # noqa: F401 (NORM_SCOPES: re-export)


def segment_bounds(offsets):
    """[(start, end)] of every segment; offsets: (L + 1,) int64 tensor or a sequence of ints."""
    o = offsets.tolist() if isinstance(offsets, torch.Tensor) else [int(v) for v in offsets]
    return list(zip(o[:-1], o[1:]))


# The functions below loop over the L segments in Python: the plain per-layer torch sequence, which is
# both the readable oracle and the honest "no fused ops" baseline (no N-sized index tensors).

def segment_sq_norm_ref(x, offsets):
    """Per-segment Σ x², shape (L,), in max(fp32, x.dtype) (accumulated in fp64 here, the most accurate
    oracle)."""
    norms = [torch.linalg.vector_norm(x[a:b], dtype=torch.float64) for a, b in segment_bounds(offsets)]
    return torch.stack(norms).square().to(accumulate_dtype(x.dtype))


def accumulate_sq_norm_ref(a, g, offsets, beta=None):
    """a_new = β_l·a + g per segment (β = None means 1), and Σ a_new² per segment.

    a, g: (N,) same dtype. beta: None or (L,) in the accumulator dtype. Returns (a_new (N,) in a's dtype,
    sq (L,) in max(fp32, a.dtype));
    the norm is of a_new as stored (after rounding to a's dtype).
    """
    if beta is None:
        a_new = (upcast(a) + upcast(g)).to(a.dtype)
    else:
        a_new = torch.empty_like(a)
        for seg, (s, e) in enumerate(segment_bounds(offsets)):
            a_new[s:e] = (upcast(beta[seg]) * upcast(a[s:e]) + upcast(g[s:e])).to(a.dtype)
    return a_new, segment_sq_norm_ref(a_new, offsets)


def perturb_scale_ref(w_sq, a_sq, gamma, scope="layer"):
    """Scale s_l with ‖s_l·a_l‖ = γ‖w_l‖ (layer) or one s with ‖s·a‖ = γ‖w‖ over all segments (global).

    w_sq, a_sq: (L,) squared norms in the accumulator dtype. Returns (L,) in their dtype.
    """
    if scope not in NORM_SCOPES:
        raise ValueError(f"scope: expected one of {NORM_SCOPES}, got {scope!r}")
    if scope == "global":
        w_sq, a_sq = w_sq.sum().expand_as(w_sq), a_sq.sum().expand_as(a_sq)
    return gamma * torch.sqrt(w_sq) / (torch.sqrt(a_sq) + SCALE_EPS)


def perturb_axpy_ref(w, a, scale, offsets, sign=1):
    """w_new = w + sign·(s_l·a) elementwise per segment; sign ∈ {+1, −1}. Returns a new tensor."""
    if sign not in (1, -1):
        raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
    out = torch.empty_like(w)
    for seg, (s, e) in enumerate(segment_bounds(offsets)):
        acc = accumulate_dtype(w.dtype)
        step = scale[seg].to(acc) * a[s:e].to(acc)
        out[s:e] = (w[s:e].to(acc) + step if sign == 1 else w[s:e].to(acc) - step).to(w.dtype)
    return out
