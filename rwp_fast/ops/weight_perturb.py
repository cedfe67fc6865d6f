"""Public op ``weight_perturb``: segmented norms, γ‖w‖ rescale and w ± v over one flat weight buffer.

SPEC.md §2. The L perturbed tensors (conv/linear ``*weight``, dim > 1) are segments of one flat 1-D
buffer; a ``SegmentTable`` built once describes them. One RWP iteration is (v = s·a):

    perturb_axpy_(w, a, s_old, table, -1)            w ← w − s_old·a
    a_sq = accumulate_sq_norm_(a, g, table, beta)    a ← β·a + g, ‖a_l‖²
    s_new = perturb_scale(w_sq, a_sq, gamma, scope)  γ‖w_l‖ / (‖a_l‖ + 1e-20), O(L) torch
    perturb_axpy_(w, a, s_new, table, +1)            w ← w + s_new·a

Every function takes ``backend=None`` (None: ``dispatch.requested_backend()``). The triton and cuda
backends launch a fixed number of kernels per call, independent of L; the torch backend is the
reference (``rwp_fast.reference.weight_perturb``).
"""

import torch

from ..reference.weight_perturb import (
    accumulate_sq_norm_ref,
    perturb_axpy_ref,
    perturb_scale_ref,
    segment_sq_norm_ref,
)
from . import dispatch

OP = "weight_perturb"
# Elements per chunk (one Triton program / CUDA block). 4096 fp32 = 16 KiB per operand: large enough
# to amortise the per-chunk table lookups, small enough that WRN-34-10's 46M weights make 11K chunks.
DEFAULT_CHUNK = 4096
# Largest alignment (in elements) that SegmentTable records. 16 elements is 16 bytes even for fp8 and
# 32/64 bytes for bf16/fp32: wider than any vector access (16 bytes = 4 fp32 or 8 fp16/bf16).
MAX_ALIGN = 16


def _alignment(offsets, chunk):
    """Largest power of two ≤ min(MAX_ALIGN, chunk) dividing every offset (so every chunk start, which is
    an offset plus a multiple of `chunk`, and every segment end). 1 when some offset is odd."""
    align = min(MAX_ALIGN, chunk)
    while align > 1 and any(o % align for o in offsets):
        align //= 2
    return align


class SegmentTable:
    """Layout of L segments in one flat (N,) buffer, cut into M chunks that never straddle a segment.

    Fields (all on one device):
      offsets (L + 1,) int64: offsets[0] = 0, segment l is [offsets[l], offsets[l + 1]), each ≥ 1 element;
      chunk_seg (M,) int32: the segment of each chunk;
      chunk_start (M,) int64: the flat index of each chunk's first element; a chunk ends at
        min(chunk_start + chunk, offsets[seg + 1]);
      seg_chunk_start (L + 1,) int32: segment l owns chunks seg_chunk_start[l] .. seg_chunk_start[l + 1] − 1;
      numel N, num_segments L, num_chunks M, chunk (a power of two) as Python ints;
      align (a power of two ≤ 16) as a Python int: every offset, hence every chunk start and segment end,
        is a multiple of align elements. Computed here from the offsets, so it is always true; the Triton
        kernels pass it to tl.multiple_of, which lets them vectorize (16-byte loads) when align ≥ 4.
        The offsets of small_cnn, PreAct ResNet-18, WRN-34-10 and WRN-28-10 are all multiples of 8.
    """

    def __init__(self, offsets, chunk=DEFAULT_CHUNK):
        """offsets: (L + 1,) int64 tensor or sequence of ints; built on the CPU, once per model."""
        chunk = int(chunk)
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk: expected a power of two, got {chunk}")
        offsets = torch.as_tensor(offsets).detach().to("cpu", torch.int64)
        if offsets.dim() != 1 or offsets.numel() < 2:
            raise ValueError(f"offsets: expected a (L + 1,) tensor with L >= 1, got shape "
                             f"{tuple(offsets.shape)}")
        lengths = offsets[1:] - offsets[:-1]
        if offsets[0].item() != 0 or (lengths < 1).any():
            raise ValueError("offsets: expected offsets[0] == 0 and strictly increasing offsets "
                             "(every segment has at least one element)")
        chunks_per_seg = (lengths + chunk - 1) // chunk
        seg_chunk_start = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        seg_chunk_start[1:] = torch.cumsum(chunks_per_seg, 0)
        num_chunks = int(seg_chunk_start[-1])
        if num_chunks >= 2 ** 31:
            raise ValueError(f"offsets: {num_chunks} chunks overflow the int32 chunk index; "
                             "use a larger chunk")
        chunk_seg = torch.repeat_interleave(torch.arange(len(lengths)), chunks_per_seg)
        chunk_start = offsets[chunk_seg] + (torch.arange(num_chunks) - seg_chunk_start[chunk_seg]) * chunk
        self.offsets = offsets
        self.offset_list = offsets.tolist()  # host copy: the torch backend slices with it, no device sync
        self.chunk_seg = chunk_seg.to(torch.int32)
        self.chunk_start = chunk_start
        self.seg_chunk_start = seg_chunk_start.to(torch.int32)
        self.numel = int(offsets[-1])
        self.num_segments = len(lengths)
        self.num_chunks = num_chunks
        self.chunk = chunk
        self.align = _alignment(self.offset_list, chunk)

    @classmethod
    def from_numels(cls, numels, chunk=DEFAULT_CHUNK):
        """Table for consecutive segments of the given sizes (e.g. [p.numel() for p in weights])."""
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + int(n))
        return cls(offsets, chunk)

    @property
    def device(self):
        return self.offsets.device

    def to(self, device):
        """A copy of this table with its tensors on `device` (self if already there)."""
        device = torch.device(device)
        if self.offsets.device == device:
            return self
        moved = object.__new__(SegmentTable)
        moved.__dict__.update(self.__dict__)
        for name in ("offsets", "chunk_seg", "chunk_start", "seg_chunk_start"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def __repr__(self):
        return (f"SegmentTable(num_segments={self.num_segments}, numel={self.numel}, "
                f"num_chunks={self.num_chunks}, chunk={self.chunk}, align={self.align}, device={self.device})")


def _backend(t, backend):
    return dispatch.choose_backend(OP, t.device, backend)


def segment_sq_norm(x, table, backend=None):
    """Per-segment Σ x², (L,) fp32. x: (N,) fp32/fp16/bf16 flat buffer described by `table`."""
    name = _backend(x, backend)
    if name == "torch":
        return segment_sq_norm_ref(x, table.offset_list)
    return dispatch.backend_module(name, OP).segment_sq_norm(x, table)


def accumulate_sq_norm_(a, g, table, beta=None, backend=None):
    """In place a ← β_l·a + g (β None means 1); returns per-segment Σ a² of the new a, (L,) fp32.

    a, g: (N,) same dtype; beta: None or (L,) fp32 (the previous scale for the 'paper' update rule).
    """
    name = _backend(a, backend)
    if name == "torch":
        a_new, sq = accumulate_sq_norm_ref(a, g, table.offset_list, beta)
        a.copy_(a_new)
        return sq
    return dispatch.backend_module(name, OP).accumulate_sq_norm_(a, g, table, beta)


def perturb_scale(w_sq, a_sq, gamma, scope="layer"):
    """Scale s (L,) fp32 with ‖s_l·a_l‖ = γ‖w_l‖ ('layer') or one global ‖s·a‖ = γ‖w‖ ('global').

    w_sq, a_sq: (L,) fp32 squared norms. Tiny O(L) torch code shared by every backend.
    """
    return perturb_scale_ref(w_sq, a_sq, gamma, scope)


def perturb_axpy_(w, a, scale, table, sign, backend=None):
    """In place w ← w + sign·(scale_l·a) per segment; returns w. w, a: (N,); scale: (L,) fp32; sign ±1."""
    name = _backend(w, backend)
    if name == "torch":
        w.copy_(perturb_axpy_ref(w, a, scale, table.offset_list, sign))
        return w
    return dispatch.backend_module(name, OP).perturb_axpy_(w, a, scale, table, sign)
