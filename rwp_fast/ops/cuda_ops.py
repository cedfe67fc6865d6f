"""The ``cuda`` backend: Python entry points to the CUDA extension ``rwp_fast._C``.

``rwp_fast.ops`` calls this module in place of the Triton modules ``rwp_fast.kernels.{pgd_step,
lsc_loss, weight_perturb}``. The functions have the same names and signatures:

    pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out) -> out
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

Fake (meta) implementations are registered with ``torch.library.register_fake``, so
``torch.compile(fullgraph=True)`` traces through every op without a graph break. The ops that write
a tensor declare it as ``Tensor(a!)`` in the schema and return nothing, which is what
auto-functionalization supports. The wrappers below return the written tensor.
"""

import torch

from rwp_fast import _C  # noqa: F401  loading the .so registers torch.ops.rwp_fast.*

_ops = torch.ops.rwp_fast


# ---------------------------------------------------------------------------------------------------
# pgd_step
# ---------------------------------------------------------------------------------------------------

def pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out):
    """One PGD step written into ``out`` (which may be ``x_adv`` itself). Returns ``out``.

    x_adv, grad, x_nat, out: (B, ...) CUDA tensors of one shape and one dtype (fp32, fp16, bf16,
    fp64), contiguous. alpha, eps: floats in pixel units. norm: 'linf' or 'l2'.
    """
    _ops.pgd_step(x_adv, grad, x_nat, float(alpha), float(eps), norm, out)
    return out


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
    count (1,) int32, masked_mean (1,) fp32 = Σ maskᵢ·ℓᵢ / B, lse (B,) fp32 saved for backward).
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


# ---------------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only, for FakeTensor tracing (torch.compile,
# torch.export) and meta tensors. They must allocate exactly what the C++ functions return, with
# no output aliasing another.
# ---------------------------------------------------------------------------------------------------

@torch.library.register_fake("rwp_fast::pgd_step")
def _pgd_step_fake(x_adv, grad, x_nat, alpha, eps, norm, out):
    return None


@torch.library.register_fake("rwp_fast::pgd_random_init")
def _pgd_random_init_fake(x_nat, noise, eps, norm, radius, out):
    return None


def _lsc_outputs_fake(logits):
    batch = logits.shape[0]
    return (logits.new_empty((batch,), dtype=torch.float32),  # loss
            logits.new_empty((batch,), dtype=torch.bool),     # mask
            logits.new_empty((1,), dtype=torch.int32),        # count
            logits.new_empty((1,), dtype=torch.float32))      # masked_mean


@torch.library.register_fake("rwp_fast::lsc_loss_fwd")
def _lsc_loss_fwd_fake(logits, target, p, q):
    lse = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    return (*_lsc_outputs_fake(logits), lse)


@torch.library.register_fake("rwp_fast::lsc_loss_bwd")
def _lsc_loss_bwd_fake(grad_out, logits, target, lse, mask):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rwp_fast::lsc_loss_trades_fwd")
def _lsc_loss_trades_fwd_fake(logits_nat, logits_adv, target, beta, p, q):
    batch = logits_nat.shape[0]
    rows = [logits_nat.new_empty((batch,), dtype=torch.float32) for _ in range(3)]  # lse_nat, lse_adv, kl
    return (*_lsc_outputs_fake(logits_nat), *rows)


@torch.library.register_fake("rwp_fast::lsc_loss_trades_bwd")
def _lsc_loss_trades_bwd_fake(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask,
                              beta):
    return (torch.empty_like(logits_nat, memory_format=torch.contiguous_format),
            torch.empty_like(logits_adv, memory_format=torch.contiguous_format))


@torch.library.register_fake("rwp_fast::segment_sq_norm")
def _segment_sq_norm_fake(x, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk):
    return x.new_empty((offsets.shape[0] - 1,), dtype=torch.float32)


@torch.library.register_fake("rwp_fast::accumulate_sq_norm_")
def _accumulate_sq_norm_fake(a, g, beta, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk):
    return a.new_empty((offsets.shape[0] - 1,), dtype=torch.float32)


@torch.library.register_fake("rwp_fast::perturb_axpy_")
def _perturb_axpy_fake(w, a, scale, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, sign):
    return None
