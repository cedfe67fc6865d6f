"""Triton kernels for the fused op ``lsc_loss``: per-example loss, LSC mask p ≤ ℓᵢ < q, and the masked
mean (1/B)·Σ Vᵢℓᵢ with its backward. SPEC.md §2; the oracle is ``rwp_fast.reference.lsc_loss``.

One program per row. The row is streamed over the classes in blocks with an online max / sum-exp
(log-sum-exp), so C is not limited by the block size (C = 1000 is one 1024-wide block; larger C loops).
All arithmetic is fp32 whatever the logits' dtype (fp32, fp16, bf16).

The forward is two launches: one program per row writes ℓᵢ and Vᵢ, then one program sums Vᵢ and
Vᵢ·ℓᵢ over the batch in a fixed order (blocks of rows in sequence, a tree within a block) for the
count, which the RWP loop reads for its early exit (SPEC.md §2), and the masked mean. Fixed order gives
the same bits on every run, which float atomics (added in the order programs finish) do not, and the
outputs need no zero-fill launches: 2 launches instead of 3.

Rounding on a GPU. The divisions by B are IEEE (``tl.div_rn``; a plain ``/`` is ``div.full.f32``, 2 ulp).
``tl.exp`` and ``tl.log`` stay the hardware approximations, for speed: ``exp(x)`` is
``ex2.approx.f32(x·log2 e)``, relative error ≤ 2 ulp of ex2 plus |x|·2⁻²⁴ from rounding the argument;
``log`` is ``lg2.approx.f32``·ln 2, absolute error ≤ 2⁻²² in log2 units. For logits within ±88 of the row max (beyond,
exp underflows in fp32) the loss is within about 100·2⁻²⁴·(1 + ℓ) ≈ 6e-6·(1 + ℓ) of the IEEE value,
which is what the GPU tolerance of tests/test_lsc_loss.py allows. The compile check asserts that no
``div.full`` and no ``.approx`` other than ``ex2``/``lg2`` is in these kernels.

A target outside [0, C) is not checked on the host (that would cost a device sync per call); the
kernel masks the out-of-range load instead, so that row's loss is NaN rather than a stray read.
"""

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor, new_output

# Classes per block. 1024 covers CIFAR-10/100 and ImageNet's 1000 classes in one block.
MAX_BLOCK_C = 1024


@triton.jit
def _row_lse(row_ptr, n_cols, BLOCK: tl.constexpr):
    """log Σ_c exp(z_c) of one row, fp32, by an online max / rescaled sum over blocks of classes."""
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # exp(−inf − m_new) = 0 for the first block and for padding lanes.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _target_logit(row_ptr, target_ptr, row, n_cols):
    y = tl.load(target_ptr + row)
    # NaN for an out-of-range target instead of reading outside the row.
    return tl.load(row_ptr + y, mask=(y >= 0) & (y < n_cols), other=float("nan")).to(tl.float32)


@triton.jit
def _lsc_store_row(loss, row, loss_ptr, mask_ptr, p, q):
    """Store ℓᵢ and Vᵢ = p ≤ ℓᵢ < q (a NaN loss is outside every range)."""
    tl.store(loss_ptr + row, loss)
    tl.store(mask_ptr + row, (loss >= p) & (loss < q))


@triton.jit
def _lsc_masked_sum_kernel(loss_ptr, mask_ptr, count_ptr, masked_mean_ptr, batch, batch_f,
                           BLOCK: tl.constexpr):
    """One program: count = Σ Vᵢ and masked_mean = (Σ Vᵢ·ℓᵢ) / B, in a fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, batch, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        inb = rows < batch
        v = tl.load(mask_ptr + rows, mask=inb, other=0).to(tl.float32)
        # Vᵢ·ℓᵢ as a product, not a select: a NaN or ±inf loss is outside the mask, and the reference's
        # 0·NaN = NaN must reach the mean so that a diverged batch is not hidden.
        acc += tl.load(loss_ptr + rows, mask=inb, other=0.0) * v
        cnt += v.to(tl.int64)
    tl.store(count_ptr, tl.sum(cnt, axis=0))
    tl.store(masked_mean_ptr, tl.div_rn(tl.sum(acc, axis=0), batch_f))


@triton.jit
def _lsc_loss_fwd_kernel(logits_ptr, target_ptr, loss_ptr, mask_ptr, lse_ptr, n_cols, p, q,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * n_cols
    lse = _row_lse(row_ptr, n_cols, BLOCK)
    loss = lse - _target_logit(row_ptr, target_ptr, row, n_cols)
    tl.store(lse_ptr + row, lse)
    _lsc_store_row(loss, row, loss_ptr, mask_ptr, p, q)


@triton.jit
def _lsc_loss_bwd_kernel(grad_out_ptr, logits_ptr, target_ptr, lse_ptr, mask_ptr, dlogits_ptr,
                         n_cols, batch, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * n_cols
    # d masked_mean / d ℓᵢ = grad_out·Vᵢ/B; d ℓᵢ / d z = softmax(z) − onehot(y).
    c = tl.div_rn(tl.load(grad_out_ptr), batch) * tl.load(mask_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    y = tl.load(target_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < n_cols
        z = tl.load(row_ptr + cols, mask=inb, other=0.0).to(tl.float32)
        d = c * (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0))
        tl.store(dlogits_ptr + row * n_cols + cols, d.to(dlogits_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _lsc_loss_trades_fwd_kernel(nat_ptr, adv_ptr, target_ptr, loss_ptr, mask_ptr, lse_nat_ptr, lse_adv_ptr,
                                kl_ptr, n_cols, beta, p, q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    nat_row = nat_ptr + row * n_cols
    adv_row = adv_ptr + row * n_cols
    lse_nat = _row_lse(nat_row, n_cols, BLOCK)
    lse_adv = _row_lse(adv_row, n_cols, BLOCK)
    # KL_i = Σ_c p_nat,c (log p_nat,c − log p_adv,c), a second pass now that both lse are known; the row
    # is in L1/L2 by now (C = 1000 fp32 is 4 KB per operand).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < n_cols
        log_p_nat = tl.load(nat_row + cols, mask=inb, other=0.0).to(tl.float32) - lse_nat
        log_p_adv = tl.load(adv_row + cols, mask=inb, other=0.0).to(tl.float32) - lse_adv
        acc += tl.where(inb, tl.exp(log_p_nat) * (log_p_nat - log_p_adv), 0.0)
    kl = tl.sum(acc, axis=0)
    loss = (lse_nat - _target_logit(nat_row, target_ptr, row, n_cols)) + beta * kl
    tl.store(lse_nat_ptr + row, lse_nat)
    tl.store(lse_adv_ptr + row, lse_adv)
    tl.store(kl_ptr + row, kl)
    _lsc_store_row(loss, row, loss_ptr, mask_ptr, p, q)


@triton.jit
def _lsc_loss_trades_bwd_kernel(grad_out_ptr, nat_ptr, adv_ptr, target_ptr, lse_nat_ptr, lse_adv_ptr,
                                kl_ptr, mask_ptr, d_nat_ptr, d_adv_ptr, n_cols, batch, beta,
                                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.div_rn(tl.load(grad_out_ptr), batch) * tl.load(mask_ptr + row).to(tl.float32)
    lse_nat = tl.load(lse_nat_ptr + row)
    lse_adv = tl.load(lse_adv_ptr + row)
    kl = tl.load(kl_ptr + row)
    y = tl.load(target_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < n_cols
        offs = row * n_cols + cols
        log_p_nat = tl.load(nat_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lse_nat
        log_p_adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32) - lse_adv
        p_nat = tl.exp(log_p_nat)
        p_adv = tl.exp(log_p_adv)
        # ∂ℓ/∂z_nat = (p_nat − onehot) + β·p_nat⊙(log p_nat − log p_adv − KL);  ∂ℓ/∂z_adv = β(p_adv − p_nat).
        d_nat = c * ((p_nat - tl.where(cols == y, 1.0, 0.0)) + beta * p_nat * (log_p_nat - log_p_adv - kl))
        d_adv = c * beta * (p_adv - p_nat)
        tl.store(d_nat_ptr + offs, d_nat.to(d_nat_ptr.dtype.element_ty), mask=inb)
        tl.store(d_adv_ptr + offs, d_adv.to(d_adv_ptr.dtype.element_ty), mask=inb)


def _launch_params(n_cols):
    """(BLOCK, num_warps): one warp for CIFAR-10's 16-wide block, 4 warps for a 1024-wide block."""
    block = min(max(triton.next_power_of_2(n_cols), 16), MAX_BLOCK_C)
    return block, 4 if block >= 1024 else (2 if block >= 256 else 1)


def _check_logits(name, logits):
    check_tensor(name, logits, dtypes=FLOAT_DTYPES, ndim=2)
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"{name}: expected a (B, C) tensor with B, C >= 1, got {tuple(logits.shape)}")


def _check_target(target, logits):
    check_tensor("target", target, dtypes=(torch.int64,), device=logits.device, shape=(logits.shape[0],))


def _check_range(p, q):
    p, q = float(p), float(q)
    if math.isnan(p) or math.isnan(q) or not p <= q:
        raise ValueError(f"p, q: the LSC range [p, q) needs p <= q, got p={p}, q={q}")
    return p, q


def _check_grad_out(grad_out, device):
    check_tensor("grad_out", grad_out, dtypes=(torch.float32,), device=device)
    if grad_out.numel() != 1:
        raise ValueError(f"grad_out: expected a () or (1,) tensor, got shape {tuple(grad_out.shape)}")


def _check_row_stats(logits, **stats):
    batch = logits.shape[0]
    for name, t in stats.items():
        dtype = torch.bool if name == "mask" else torch.float32
        check_tensor(name, t, dtypes=(dtype,), device=logits.device, shape=(batch,))


# Rows per block of the masked sum: a training batch (128–1024) is one block; larger B loops.
REDUCE_BLOCK = 1024


def _new_row_outputs(batch, device):
    """loss (B,) fp32 and mask (B,) bool, written by the row kernels."""
    return new_output((batch,), torch.float32, device), new_output((batch,), torch.bool, device)


def _masked_sum(loss, mask):
    """(count (1,) int64, masked_mean (1,) fp32) by the one-program fixed-order sum."""
    batch = loss.shape[0]
    count = new_output((1,), torch.int64, loss.device)
    masked_mean = new_output((1,), torch.float32, loss.device)
    block = min(max(triton.next_power_of_2(batch), 16), REDUCE_BLOCK)
    _lsc_masked_sum_kernel[(1,)](loss, mask, count, masked_mean, batch, float(batch), BLOCK=block,
                                 num_warps=4 if block >= 512 else 1)
    return count, masked_mean


def _check_fwd(logits, target, p, q):
    _check_logits("logits", logits)
    _check_target(target, logits)
    return _check_range(p, q)


def _check_bwd(grad_out, logits, target, lse, mask):
    _check_logits("logits", logits)
    _check_target(target, logits)
    _check_grad_out(grad_out, logits.device)
    _check_row_stats(logits, lse=lse, mask=mask)


def _check_trades_logits(logits_nat, logits_adv, target):
    _check_logits("logits_nat", logits_nat)
    check_tensor("logits_adv", logits_adv, dtypes=FLOAT_DTYPES, device=logits_nat.device,
                 shape=logits_nat.shape)
    check_same_dtype("logits_adv", logits_adv, "logits_nat", logits_nat)
    _check_target(target, logits_nat)


def _check_trades_fwd(logits_nat, logits_adv, target, beta, p, q):
    _check_trades_logits(logits_nat, logits_adv, target)
    return _check_range(p, q)


def _check_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta):
    _check_trades_logits(logits_nat, logits_adv, target)
    _check_grad_out(grad_out, logits_nat.device)
    _check_row_stats(logits_nat, lse_nat=lse_nat, lse_adv=lse_adv, kl=kl, mask=mask)


def _fwd_outputs_fake(logits, row_stats):
    """(loss, mask, count, masked_mean) and `row_stats` fp32 (B,) vectors, as the forwards return."""
    b = logits.shape[0]
    return (logits.new_empty((b,), dtype=torch.float32), logits.new_empty((b,), dtype=torch.bool),
            logits.new_empty((1,), dtype=torch.int64), logits.new_empty((1,), dtype=torch.float32),
            *(logits.new_empty((b,), dtype=torch.float32) for _ in range(row_stats)))


Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Tensors7 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# The library ops (``torch.ops.rwp_triton.*``) with the CUDA extension's schemas; see kernels/pgd_step.py.
@torch.library.custom_op("rwp_triton::lsc_loss_fwd", mutates_args=())
def lsc_loss_fwd(logits: torch.Tensor, target: torch.Tensor, p: float, q: float) -> Tensors5:
    """Per-example CE with the LSC mask.

    logits: (B, C) contiguous fp32/fp16/bf16; target: (B,) int64 in [0, C); p, q: floats, p <= q.
    Returns (loss (B,) fp32, mask (B,) bool = p ≤ loss < q, count (1,) int64 = Σ mask,
    masked_mean (1,) fp32 = Σ mask·loss / B, lse (B,) fp32 log-sum-exp of each row, for the backward).
    """
    p, q = _check_fwd(logits, target, p, q)
    batch, n_cols = logits.shape
    loss, mask = _new_row_outputs(batch, logits.device)
    lse = new_output((batch,), torch.float32, logits.device)
    block, num_warps = _launch_params(n_cols)
    with _common.on_device(logits):
        _lsc_loss_fwd_kernel[(batch,)](logits, target, loss, mask, lse, n_cols, p, q, BLOCK=block,
                                       num_warps=num_warps)
        count, masked_mean = _masked_sum(loss, mask)
    return loss, mask, count, masked_mean, lse


@torch.library.custom_op("rwp_triton::lsc_loss_bwd", mutates_args=())
def lsc_loss_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """dlogits (B, C) in logits.dtype = grad_out·maskᵢ/B·(softmax(logits) − onehot(target)).

    grad_out: () or (1,) fp32 gradient of the masked mean; lse: (B,) fp32 and mask: (B,) bool from
    lsc_loss_fwd.
    """
    _check_bwd(grad_out, logits, target, lse, mask)
    batch, n_cols = logits.shape
    dlogits = new_output((batch, n_cols), logits.dtype, logits.device)
    block, num_warps = _launch_params(n_cols)
    with _common.on_device(logits):
        _lsc_loss_bwd_kernel[(batch,)](grad_out, logits, target, lse, mask, dlogits, n_cols, float(batch),
                                       BLOCK=block, num_warps=num_warps)
    return dlogits


@torch.library.custom_op("rwp_triton::lsc_loss_trades_fwd", mutates_args=())
def lsc_loss_trades_fwd(logits_nat: torch.Tensor, logits_adv: torch.Tensor, target: torch.Tensor, beta: float,
                        p: float, q: float) -> Tensors7:
    """TRADES per-example loss ℓᵢ = CE(z_natᵢ, yᵢ) + β·KLᵢ with the LSC mask.

    logits_nat, logits_adv: (B, C) contiguous, same dtype (fp32/fp16/bf16) and device; target: (B,)
    int64. Returns (loss, mask, count, masked_mean, lse_nat, lse_adv, kl) with the conventions of
    lsc_loss_fwd and kl (B,) fp32 = Σ_c p_nat,c (log p_nat,c − log p_adv,c).
    """
    p, q = _check_trades_fwd(logits_nat, logits_adv, target, beta, p, q)
    batch, n_cols = logits_nat.shape
    device = logits_nat.device
    loss, mask = _new_row_outputs(batch, device)
    lse_nat, lse_adv, kl = (new_output((batch,), torch.float32, device) for _ in range(3))
    block, num_warps = _launch_params(n_cols)
    with _common.on_device(logits_nat):
        _lsc_loss_trades_fwd_kernel[(batch,)](logits_nat, logits_adv, target, loss, mask, lse_nat, lse_adv, kl,
                                              n_cols, float(beta), p, q, BLOCK=block, num_warps=num_warps)
        count, masked_mean = _masked_sum(loss, mask)
    return loss, mask, count, masked_mean, lse_nat, lse_adv, kl


@torch.library.custom_op("rwp_triton::lsc_loss_trades_bwd", mutates_args=())
def lsc_loss_trades_bwd(grad_out: torch.Tensor, logits_nat: torch.Tensor, logits_adv: torch.Tensor,
                        target: torch.Tensor, lse_nat: torch.Tensor, lse_adv: torch.Tensor, kl: torch.Tensor,
                        mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_nat, d_adv), each (B, C) in the logits' dtype, with cᵢ = grad_out·maskᵢ/B:
    d_nat = cᵢ·[(p_nat − onehot) + β·p_nat⊙(log p_nat − log p_adv − klᵢ)], d_adv = cᵢ·β·(p_adv − p_nat).
    """
    _check_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta)
    batch, n_cols = logits_nat.shape
    d_nat = new_output((batch, n_cols), logits_nat.dtype, logits_nat.device)
    d_adv = new_output((batch, n_cols), logits_nat.dtype, logits_nat.device)
    block, num_warps = _launch_params(n_cols)
    with _common.on_device(logits_nat):
        _lsc_loss_trades_bwd_kernel[(batch,)](grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl,
                                              mask, d_nat, d_adv, n_cols, float(batch), float(beta),
                                              BLOCK=block, num_warps=num_warps)
    return d_nat, d_adv


@lsc_loss_fwd.register_fake
def _lsc_loss_fwd_fake(logits, target, p, q):
    _check_fwd(logits, target, p, q)
    return _fwd_outputs_fake(logits, 1)


@lsc_loss_bwd.register_fake
def _lsc_loss_bwd_fake(grad_out, logits, target, lse, mask):
    _check_bwd(grad_out, logits, target, lse, mask)
    return torch.empty_like(logits)


@lsc_loss_trades_fwd.register_fake
def _lsc_loss_trades_fwd_fake(logits_nat, logits_adv, target, beta, p, q):
    _check_trades_fwd(logits_nat, logits_adv, target, beta, p, q)
    return _fwd_outputs_fake(logits_nat, 3)


@lsc_loss_trades_bwd.register_fake
def _lsc_loss_trades_bwd_fake(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta):
    _check_trades_bwd(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, beta)
    return torch.empty_like(logits_nat), torch.empty_like(logits_nat)
