"""The ``cuda`` backend: Python entry points to the CUDA extension ``rwp_fast._C``.

``rwp_fast.ops`` calls this module in place of the Triton modules ``rwp_fast.kernels.{pgd_step,
lsc_loss, weight_perturb}``. The functions have the same names and signatures:

    pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out) -> out
    pgd_step_(x_adv, grad, x_nat, alpha, eps, norm) -> x_adv     (x_adv is updated in place)
    pgd_random_init(x_nat, noise, eps, norm, radius, out) -> out
    lsc_loss_fwd(logits, target, p, q) -> (loss, mask, count, masked_mean, lse)
    lsc_loss_bwd(grad_out, logits, target, lse, mask) -> dlogits
    lsc_loss_trades_fwd(logits_nat, logits_adv, target, beta, p, q)
        -> (loss, mask, count, masked_mean, lse_nat, lse_adv, kl)
    lsc_loss_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta)
        -> (d_nat, d_adv)
    segment_sq_norm(x, table) -> (L,) fp32
    accumulate_sq_norm_(a, g, table, beta) -> (L,) fp32   (a is updated in place)
    perturb_axpy_(w, a, scale, table, sign) -> w          (w is updated in place)

Each one calls an op that csrc/bindings.cpp registers as ``torch.ops.rwp_fast.<name>``. The C++ side
checks every argument (device, dtype, shape, contiguity) and names it in the message. Here the
functions only unpack the ``SegmentTable`` and check what C++ cannot see, such as ``table.numel``.

Importing this module loads the extension. If it was not built, the original ImportError
propagates, so ``dispatch`` can fall back (``auto``) or report it (explicit ``cuda``).

Fake (meta) implementations live in ``rwp_fast.ops.fake_impls``, which loading ``rwp_fast._C`` imports
(csrc/bindings.cpp), so ``torch.compile(fullgraph=True)`` traces through every op without a graph
break. The ops that write a tensor declare it as ``Tensor(a!)`` in the schema and return nothing,
which is what auto-functionalization supports. The wrappers below return the written tensor.
"""

import torch

from rwp_fast import _C  # noqa: F401  loading the .so registers torch.ops.rwp_fast.* and their fake impls

_ops = torch.ops.rwp_fast


# ---------------------------------------------------------------------------------------------------
# pgd_step
# ---------------------------------------------------------------------------------------------------

def pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out):
    """One PGD step written into ``out``. Returns ``out``. ``out is x_adv`` runs the in-place op.

    x_adv, grad, x_nat, out: (B, ...) CUDA tensors of one shape and one dtype (fp32, fp16, bf16),
    contiguous. alpha, eps: floats in pixel units. norm: 'linf' or 'l2'.
    """
    if out is x_adv:  # the out-of-place op's schema does not mark x_adv as written
        return pgd_step_(x_adv, grad, x_nat, alpha, eps, norm)
    _ops.pgd_step(x_adv, grad, x_nat, float(alpha), float(eps), norm, out)
    return out


def pgd_step_(x_adv, grad, x_nat, alpha, eps, norm):
    """In-place PGD step: x_adv is overwritten with the next iterate and returned. The op's schema
    marks x_adv as written (Tensor(a!) x_adv), so torch.compile functionalizes it correctly."""
    _ops.pgd_step_(x_adv, grad, x_nat, float(alpha), float(eps), norm)
    return x_adv


def pgd_random_init(x_nat, noise, eps, norm, radius, out):
    """Random start clamp(x_nat + δ0, 0, 1) written into ``out``. Returns ``out``.

    noise: x_nat's shape, fp32 or x_nat's dtype. radius: (B,) U(0, 1) draws for 'l2', or None for
    'linf'. A radius of another dtype is cast to fp32 here; it is only B numbers.
    """
    if radius is not None and (radius.dtype != torch.float32 or not radius.is_contiguous()):
        radius = radius.to(torch.float32).contiguous()
    _ops.pgd_random_init(x_nat, noise, float(eps), norm, radius, out)
    return out


# ---------------------------------------------------------------------------------------------------
# lsc_loss
# ---------------------------------------------------------------------------------------------------

def lsc_loss_fwd(logits, target, p, q):
    """Per-example CE with the LSC mask p ≤ ℓᵢ < q.

    logits: (B, C) float; target: (B,) int64. Returns (loss (B,) fp32, mask (B,) bool,
    count (1,) int64, masked_mean (1,) fp32 = Σ maskᵢ·ℓᵢ / B, lse (B,) fp32 saved for backward).
    """
    return _ops.lsc_loss_fwd(logits, target, float(p), float(q))


def lsc_loss_bwd(grad_out, logits, target, lse, mask):
    """d masked_mean / d logits times grad_out, shape (B, C), in logits.dtype.

    grad_out: one fp32 element on the device; it is read there, with no host sync.
    """
    return _ops.lsc_loss_bwd(grad_out, logits, target, lse, mask)


def lsc_loss_trades_fwd(logits_nat, logits_adv, target, beta, p, q):
    """TRADES: ℓᵢ = CE(z_nat, y) + β·klᵢ. Returns (loss, mask, count, masked_mean, lse_nat, lse_adv,
    kl), as lsc_loss_fwd does, plus the (B,) fp32 lse_nat, lse_adv and kl that the backward needs."""
    return _ops.lsc_loss_trades_fwd(logits_nat, logits_adv, target, float(beta), float(p), float(q))


def lsc_loss_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta):
    """(d_nat, d_adv): (B, C) gradients in the logits' dtype."""
    return _ops.lsc_loss_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl,
                                    mask, float(beta))


# ---------------------------------------------------------------------------------------------------
# weight_perturb. `table` is a rwp_fast.ops.weight_perturb.SegmentTable on the buffers' device.
# ---------------------------------------------------------------------------------------------------

def _table_args(table):
    return (table.offsets, table.chunk_seg, table.chunk_start, table.seg_chunk_start, int(table.chunk))


def _check_numel(name, x, table):
    # The device-side table cannot be read without a sync. The kernels clamp to x.numel(), so a
    # mismatch would not read out of bounds, but it would give wrong norms. Check the host copy here.
    if x.numel() != table.numel:
        raise ValueError(f"{name}: expected {table.numel} elements (table.numel), got {x.numel()}")


def segment_sq_norm(x, table):
    """Per-segment Σ x², (L,) fp32. x: (N,) contiguous CUDA buffer."""
    _check_numel("x", x, table)
    return _ops.segment_sq_norm(x, *_table_args(table))


def accumulate_sq_norm_(a, g, table, beta):
    """In place a ← β_l·a + g (β None: a + g). Returns Σ a² per segment of the new a as stored.

    a, g: (N,) same dtype; beta: None or (L,) fp32.
    """
    _check_numel("a", a, table)
    _check_numel("g", g, table)
    return _ops.accumulate_sq_norm_(a, g, beta, *_table_args(table))


def perturb_axpy_(w, a, scale, table, sign):
    """In place w ← w + sign·(scale_l·a). Returns w. scale: (L,) fp32; sign: +1 or -1."""
    _check_numel("w", w, table)
    _check_numel("a", a, table)
    _ops.perturb_axpy_(w, a, scale, *_table_args(table), int(sign))
    return w
