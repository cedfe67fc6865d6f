"""Triton kernels for the fused op ``weight_perturb``: per-tensor squared norms, the running-sum update
a ← β·a + g, and w ← w ± s·a, over all perturbed weight tensors at once. SPEC.md §2; the oracle is
``rwp_fast.reference.weight_perturb``.

The L perturbed tensors are segments of one flat 1-D buffer, described by a ``SegmentTable``
(``rwp_fast.ops.weight_perturb``): the buffer is cut into chunks of at most ``table.chunk`` elements that
never straddle a segment, and one program handles one chunk. So every launch covers all L tensors and
the number of launches per call is fixed (1 or 2), whatever L is: PreAct ResNet-18 has 21 perturbed
tensors, WRN-34-10 has 35.

Norms are two-stage and deterministic, without atomics: each chunk writes its fp32 partial Σx² to an
(M,) buffer, then ``_segment_sum_kernel`` (one program per segment) sums that segment's partials in a
fixed order. Elementwise arithmetic is fp32, rounded to the buffer's dtype on store. The elementwise
kernels are launched with ``NO_FMA`` (``enable_fp_fusion=False``) so that s·a is rounded before the add,
exactly as the reference's two torch ops: ``perturb_axpy_`` then matches ``perturb_axpy_ref`` bit for
bit in fp32 (and in fp16/bf16, which round the same fp32 value once).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import FLOAT_DTYPES, check_same_dtype, check_tensor, new_output

# Chunk partials summed per iteration of the per-segment reduction. WRN-34-10's largest tensor
# (640·640·3·3 = 3.7M elements) has 900 chunks of 4096: 8 iterations.
REDUCE_BLOCK = 128
# Launch option for the elementwise kernels: s·a (and β·a) rounded before the add, as the reference's
# separate torch ops do, instead of one FMA rounding. Free for memory-bound kernels.
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _chunk_extent(chunk_seg_ptr, chunk_start_ptr, offsets_ptr, CHUNK: tl.constexpr, ALIGN: tl.constexpr):
    """(segment, element offsets of this program's chunk, in-bounds mask).

    ALIGN is ``table.align``: SegmentTable computed on the host that every chunk start and segment end
    is a multiple of it. Only with that hint can the compiler prove that 4 fp32 (8 fp16/bf16) lanes
    share one 16-byte aligned, all-or-nothing masked access: without it every CHUNK=4096 variant
    compiled to scalar ld.global.b32 at 71-78 registers on sm_90, with it to ld.global.v4 at 32 or fewer
    (kernels/_compile_check.py asserts both).
    """
    chunk = tl.program_id(0)
    seg = tl.load(chunk_seg_ptr + chunk)
    start = tl.multiple_of(tl.load(chunk_start_ptr + chunk), ALIGN)
    end = tl.multiple_of(tl.load(offsets_ptr + seg + 1), ALIGN)
    offs = start + tl.arange(0, CHUNK)
    return seg, offs, offs < end


@triton.jit
def _segment_sq_norm_partial_kernel(x_ptr, chunk_seg_ptr, chunk_start_ptr, offsets_ptr, partial_ptr,
                                    CHUNK: tl.constexpr, ALIGN: tl.constexpr):
    _seg, offs, inb = _chunk_extent(chunk_seg_ptr, chunk_start_ptr, offsets_ptr, CHUNK, ALIGN)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(x * x, axis=0))


@triton.jit
def _accumulate_sq_norm_partial_kernel(a_ptr, g_ptr, beta_ptr, chunk_seg_ptr, chunk_start_ptr, offsets_ptr,
                                       partial_ptr, CHUNK: tl.constexpr, ALIGN: tl.constexpr,
                                       HAS_BETA: tl.constexpr):
    seg, offs, inb = _chunk_extent(chunk_seg_ptr, chunk_start_ptr, offsets_ptr, CHUNK, ALIGN)
    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_BETA:
        a = tl.load(beta_ptr + seg) * a + g
    else:
        a = a + g
    a_stored = a.to(a_ptr.dtype.element_ty)
    tl.store(a_ptr + offs, a_stored, mask=inb)
    # The norm of a as stored (after rounding to a's dtype), as accumulate_sq_norm_ref defines it.
    a = a_stored.to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(a * a, axis=0))


@triton.jit
def _segment_sum_kernel(partial_ptr, seg_chunk_start_ptr, out_ptr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    first = tl.load(seg_chunk_start_ptr + seg)
    last = tl.load(seg_chunk_start_ptr + seg + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(first, last, BLOCK):
        idx = c + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < last, other=0.0)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))


@triton.jit
def _perturb_axpy_kernel(w_ptr, a_ptr, scale_ptr, chunk_seg_ptr, chunk_start_ptr, offsets_ptr,
                         CHUNK: tl.constexpr, ALIGN: tl.constexpr, SIGN: tl.constexpr):
    seg, offs, inb = _chunk_extent(chunk_seg_ptr, chunk_start_ptr, offsets_ptr, CHUNK, ALIGN)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    step = tl.load(scale_ptr + seg) * a
    if SIGN > 0:
        w = w + step
    else:
        w = w - step
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=inb)


def _num_warps(chunk):
    # 4096 fp32 over 8 warps is 16 elements per thread.
    return 8 if chunk >= 4096 else (4 if chunk >= 512 else 1)


class _Table:
    """The SegmentTable fields the kernels read, rebuilt from an op's tensor and int arguments."""

    def __init__(self, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel):
        self.offsets, self.chunk_seg, self.chunk_start = offsets, chunk_seg, chunk_start
        self.seg_chunk_start, self.chunk, self.align, self.numel = seg_chunk_start, chunk, align, numel
        self.num_segments, self.num_chunks = offsets.shape[0] - 1, chunk_seg.shape[0]


def _table_args(table):
    """The op arguments of a SegmentTable: its four tensors, chunk, align and numel (a host number the
    device tensors cannot give without a sync; the kernels trust it, so every op checks it)."""
    return (table.offsets, table.chunk_seg, table.chunk_start, table.seg_chunk_start, int(table.chunk),
            int(table.align), int(table.numel))


def _check_table(table, device):
    for name in ("offsets", "chunk_seg", "chunk_start", "seg_chunk_start"):
        t = getattr(table, name)
        if t.device != device:
            raise ValueError(f"table: its {name} is on {t.device} but the buffers are on {device}; "
                             f"call table.to({str(device)!r}) once")


def _check_flat(name, x, table, ref_name=None, ref=None):
    check_tensor(name, x, dtypes=FLOAT_DTYPES, device=None if ref is None else ref.device, ndim=1)
    if x.numel() != table.numel:
        raise ValueError(f"{name}: expected {table.numel} elements (table.numel), got {x.numel()}")
    if ref is not None:
        check_same_dtype(name, x, ref_name, ref)


def _check_per_segment(name, t, table, device):
    check_tensor(name, t, dtypes=(torch.float32,), device=device, shape=(table.num_segments,))


def _check_sq_norm(x, table):
    _check_flat("x", x, table)
    _check_table(table, x.device)


def _check_accumulate(a, g, beta, table):
    _check_flat("a", a, table)
    _check_flat("g", g, table, "a", a)
    _check_table(table, a.device)
    if beta is not None:
        _check_per_segment("beta", beta, table, a.device)


def _check_axpy(w, a, scale, table, sign):
    if sign not in (1, -1):
        raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
    _check_flat("w", w, table)
    _check_flat("a", a, table, "w", w)
    _check_table(table, w.device)
    _check_per_segment("scale", scale, table, w.device)


def _segment_sum(partial, table, device):
    out = new_output((table.num_segments,), torch.float32, device)
    with _common.on_device(partial):
        _segment_sum_kernel[(table.num_segments,)](partial, table.seg_chunk_start, out, BLOCK=REDUCE_BLOCK,
                                                   num_warps=1)
    return out


# The library ops (``torch.ops.rwp_triton.*``): the CUDA extension's schemas plus ``align`` (the largest
# power of two ≤ 16 dividing every offset, a host fact the kernels' vector hints need) and ``numel`` (the
# kernels index by the table, so a short buffer would be read out of bounds); see kernels/pgd_step.py.
# The fakes run the same checks.
@torch.library.custom_op("rwp_triton::segment_sq_norm", mutates_args=())
def _segment_sq_norm_op(x: torch.Tensor, offsets: torch.Tensor, chunk_seg: torch.Tensor, chunk_start: torch.Tensor,
                        seg_chunk_start: torch.Tensor, chunk: int, align: int, numel: int) -> torch.Tensor:
    table = _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel)
    _check_sq_norm(x, table)
    partial = new_output((table.num_chunks,), torch.float32, x.device)
    with _common.on_device(x):
        _segment_sq_norm_partial_kernel[(table.num_chunks,)](
            x, table.chunk_seg, table.chunk_start, table.offsets, partial,
            CHUNK=table.chunk, ALIGN=table.align, num_warps=_num_warps(table.chunk))
    return _segment_sum(partial, table, x.device)


@torch.library.custom_op("rwp_triton::accumulate_sq_norm_", mutates_args={"a"})
def _accumulate_sq_norm_op(a: torch.Tensor, g: torch.Tensor, beta: torch.Tensor | None, offsets: torch.Tensor,
                           chunk_seg: torch.Tensor, chunk_start: torch.Tensor, seg_chunk_start: torch.Tensor,
                           chunk: int, align: int, numel: int) -> torch.Tensor:
    table = _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel)
    _check_accumulate(a, g, beta, table)
    partial = new_output((table.num_chunks,), torch.float32, a.device)
    with _common.on_device(a):
        _accumulate_sq_norm_partial_kernel[(table.num_chunks,)](
            a, g, a if beta is None else beta, table.chunk_seg, table.chunk_start, table.offsets, partial,
            CHUNK=table.chunk, ALIGN=table.align, HAS_BETA=beta is not None, num_warps=_num_warps(table.chunk),
            **NO_FMA)
    return _segment_sum(partial, table, a.device)


@torch.library.custom_op("rwp_triton::perturb_axpy_", mutates_args={"w"})
def _perturb_axpy_op(w: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
                     chunk_seg: torch.Tensor, chunk_start: torch.Tensor, seg_chunk_start: torch.Tensor, chunk: int,
                     align: int, numel: int, sign: int) -> None:
    table = _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel)
    _check_axpy(w, a, scale, table, sign)
    with _common.on_device(w):
        _perturb_axpy_kernel[(table.num_chunks,)](
            w, a, scale, table.chunk_seg, table.chunk_start, table.offsets,
            CHUNK=table.chunk, ALIGN=table.align, SIGN=sign, num_warps=_num_warps(table.chunk), **NO_FMA)


@_segment_sq_norm_op.register_fake
def _segment_sq_norm_fake(x, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel):
    table = _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel)
    _check_sq_norm(x, table)
    return x.new_empty((table.num_segments,), dtype=torch.float32)


@_accumulate_sq_norm_op.register_fake
def _accumulate_sq_norm_fake(a, g, beta, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel):
    table = _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel)
    _check_accumulate(a, g, beta, table)
    return a.new_empty((table.num_segments,), dtype=torch.float32)


@_perturb_axpy_op.register_fake
def _perturb_axpy_fake(w, a, scale, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel, sign):
    _check_axpy(w, a, scale, _Table(offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, align, numel), sign)


def segment_sq_norm(x, table):
    """Per-segment Σ x², (L,) fp32. x: (N,) contiguous fp32/fp16/bf16 with N = table.numel."""
    return torch.ops.rwp_triton.segment_sq_norm(x, *_table_args(table))


def accumulate_sq_norm_(a, g, table, beta):
    """In place a ← β_l·a + g per segment (β None means 1); returns per-segment Σ a² of the new a as
    stored, (L,) fp32. a, g: (N,) contiguous, same dtype (fp32/fp16/bf16); beta: None or (L,) fp32.
    """
    if beta is not None:
        _check_per_segment("beta", beta, table, a.device)  # before the schema's own, unnamed type check
    return torch.ops.rwp_triton.accumulate_sq_norm_(a, g, beta, *_table_args(table))


def perturb_axpy_(w, a, scale, table, sign):
    """In place w ← w + sign·(scale_l·a) per segment (fp32 math, rounded to w's dtype); returns w.

    w, a: (N,) contiguous, same dtype (fp32/fp16/bf16); scale: (L,) fp32; sign: +1 or −1.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
    torch.ops.rwp_triton.perturb_axpy_(w, a, scale, *_table_args(table), int(sign))
    return w
