"""The fused op ``weight_perturb`` against its reference ``rwp_fast.reference.weight_perturb``
(SPEC.md §2): segmented squared norms, a ← β·a + g with its norms, w ± s·a, over one flat buffer.
"""


import pytest
import torch

from kernel_helpers import poison_cuda_allocator
from rwp_fast import ops
from rwp_fast.ops import dispatch
from rwp_fast.ops.weight_perturb import SegmentTable
from rwp_fast.reference.perturbation_search import _rescale
from rwp_fast.reference.weight_perturb import accumulate_sq_norm_ref, perturb_axpy_ref, segment_sq_norm_ref
from rwp_fast.verify import tolerances

# Segment sizes: a 1-element segment, sizes that are not multiples of the chunk, and segments of
# several chunks. With chunk 4096: 4101 is 2 chunks, 8192 exactly 2. With chunk 64 (the "small"
# layout) most segments span many chunks, so the per-segment reduction loops. A table of one 1-element
# segment, and one of whole chunks with a short last segment.
LAYOUTS = {
    "default_chunk": ([1, 37, 4101, 8192, 3], 4096),
    "small_chunk": ([300, 1, 64, 65, 129, 1000, 2], 64),
    "one_element": ([1], 4096),
    "whole_chunks": ([4096, 4096, 12], 4096),
}
# Norms: fp32 partial sums over ≤ 4096 elements, then a sum of chunk partials, against the reference's
# fp64 accumulation: relative error ≲ log2(n)·2⁻²⁴ ≈ 1e-6 for tree sums; rtol 1e-5 leaves 10×.
NORM_TOL = tolerances.NORM_TOL  # the one table, shared with `rwp-fast verify`


@pytest.fixture(params=list(LAYOUTS))
def table(request, device):
    numels, chunk = LAYOUTS[request.param]
    return SegmentTable.from_numels(numels, chunk).to(device)


def test_segment_table_by_hand():
    t = SegmentTable([0, 1, 5, 14], chunk=4)  # lengths 1, 4, 9 → 1, 1, 3 chunks
    assert (t.numel, t.num_segments, t.num_chunks, t.chunk) == (14, 3, 5, 4)
    assert t.seg_chunk_start.tolist() == [0, 1, 2, 5] and t.seg_chunk_start.dtype == torch.int32
    assert t.chunk_seg.tolist() == [0, 1, 2, 2, 2] and t.chunk_seg.dtype == torch.int32
    assert t.chunk_start.tolist() == [0, 1, 5, 9, 13] and t.chunk_start.dtype == torch.int64
    assert t.offsets.tolist() == [0, 1, 5, 14] and t.offsets.dtype == torch.int64
    assert SegmentTable.from_numels([1, 4, 9], chunk=4).chunk_start.tolist() == [0, 1, 5, 9, 13]
    moved = t.to("meta")
    assert moved.offsets.device.type == "meta" and t.offsets.device.type == "cpu" and moved.num_chunks == 5


@pytest.mark.parametrize("offsets,chunk,align", [
    ([0, 1, 5, 14], 4, 1), ([0, 16, 48], 4096, 16), ([0, 8, 40], 4096, 8), ([0, 64, 128], 4, 4),
    ([0, 4096 * 3 + 2], 4096, 2)])
def test_segment_table_records_alignment(offsets, chunk, align):
    """table.align is what the Triton kernels hand to tl.multiple_of: it must divide every offset (so
    every chunk start and segment end), be a power of two, and be as large as that allows (up to 16)."""
    t = SegmentTable(offsets, chunk)
    assert t.align == align
    assert all(o % t.align == 0 for o in t.chunk_start.tolist() + t.offsets.tolist())
    assert t.to("meta").align == align


@pytest.mark.parametrize("name,in_channels", [("small_cnn", 1), ("small_cnn", 3), ("preact_resnet18", 3)])
def test_flat_weights_of_real_models_are_vector_aligned(name, in_channels):
    """The segment offsets of the models we train are multiples of 8 elements, so the weight_perturb
    kernels run their 16-byte vector path (kernels/_compile_check.py proves the vector loads)."""
    from rwp_fast.models import build_network
    from rwp_fast.perturb.flat import FlatWeights

    assert FlatWeights(build_network(name, 10, in_channels)).table.align >= 8


@pytest.mark.parametrize("offsets,chunk,match", [
    ([1, 5], 4, "offsets"), ([0, 3, 3], 4, "offsets"), ([0], 4, "offsets"), ([0, 5], 3, "chunk")])
def test_segment_table_rejects_bad_layouts(offsets, chunk, match):
    with pytest.raises(ValueError, match=match):
        SegmentTable(offsets, chunk)


def test_segment_sq_norm(backend, device, table):
    x = torch.randn(table.numel, device=device)
    poison_cuda_allocator(device)
    sq = ops.segment_sq_norm(x, table, backend=backend)
    assert sq.shape == (table.num_segments,) and sq.dtype == torch.float32
    torch.testing.assert_close(sq, segment_sq_norm_ref(x, table.offsets), **NORM_TOL)
    # The per-segment sum has a fixed order and no float atomics: identical bits from run to run.
    assert torch.equal(sq, ops.segment_sq_norm(x, table, backend=backend))


@pytest.mark.parametrize("with_beta", [False, True])
def test_accumulate_sq_norm(backend, device, table, with_beta):
    a = torch.randn(table.numel, device=device)
    g = torch.randn(table.numel, device=device)
    beta = torch.rand(table.num_segments, device=device) * 2 if with_beta else None
    a_ref, sq_ref = accumulate_sq_norm_ref(a, g, table.offsets, beta)
    poison_cuda_allocator(device)
    sq = ops.accumulate_sq_norm_(a, g, table, beta, backend=backend)
    # β·a + g rounded twice, as torch does: Triton launches with FMA contraction off, and the CUDA kernel uses
    # __fmul_rn/__fadd_rn, which nvcc never contracts into an FMA (csrc/weight_perturb.cu)
    assert torch.equal(a, a_ref)
    torch.testing.assert_close(sq, sq_ref, **NORM_TOL)


@pytest.mark.parametrize("sign", [1, -1])
def test_perturb_axpy_is_bit_exact(backend, device, table, sign):
    w = torch.randn(table.numel, device=device)
    a = torch.randn(table.numel, device=device)
    scale = torch.rand(table.num_segments, device=device) * 0.1
    expected = perturb_axpy_ref(w, a, scale, table.offsets, sign)
    returned = ops.perturb_axpy_(w, a, scale, table, sign, backend=backend)
    assert returned.data_ptr() == w.data_ptr()
    assert torch.equal(w, expected)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_rwp_iteration_matches_per_layer_reference(backend, device, scope):
    """w − s_old·a, a ← a + g, s = γ‖w‖/‖a‖, w + s·a over the flat buffer equals the per-layer
    reference rescale v_l = γ‖w_l‖·a_l/‖a_l‖ (SPEC.md §2, 'accumulate' rule)."""
    shapes = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (10, 16), (1, 1)]
    numels = [torch.Size(s).numel() for s in shapes]
    table = SegmentTable.from_numels(numels, chunk=64).to(device)
    w0 = torch.randn(table.numel, device=device)
    a = torch.randn(table.numel, device=device)
    g = torch.randn(table.numel, device=device)
    gamma = 0.01
    w_sq = ops.segment_sq_norm(w0, table, backend=backend)
    s_old = ops.perturb_scale(w_sq, ops.segment_sq_norm(a, table, backend=backend), gamma, scope)
    w = w0.clone()
    ops.perturb_axpy_(w, a, s_old, table, +1, backend=backend)  # the current perturbed weights w0 + v
    ops.perturb_axpy_(w, a, s_old, table, -1, backend=backend)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)  # (w + v) − v: one rounding of |w| ≲ 4
    a_sq = ops.accumulate_sq_norm_(a, g, table, None, backend=backend)
    s_new = ops.perturb_scale(w_sq, a_sq, gamma, scope)
    ops.perturb_axpy_(w, a, s_new, table, +1, backend=backend)
    def split(t):
        return list(t.split(numels))
    w_norms = [wl.norm() for wl in split(w0)]
    v_ref = torch.cat(_rescale(split(a), w_norms, gamma, scope))
    # w − w0 recovers v only up to the roundings of w ± v, w and (w − v) + v: ~2 ulps of |w| ≲ 4 (ulp
    # 4.8e-7), against |v| ~ γ|w| ~ 0.01.
    torch.testing.assert_close(w - w0, v_ref, rtol=1e-4, atol=2e-6)


class _LaunchCounter:
    """Stands in for a @triton.jit kernel: counts `kernel[grid](...)` launches, then runs them."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)
        return run


def test_triton_launch_count_does_not_depend_on_num_segments(device, require_backend, monkeypatch):
    require_backend("triton")
    from rwp_fast.kernels import weight_perturb as kernels
    counts = {}
    for name in [n for n in vars(kernels) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(kernels, name, _LaunchCounter(getattr(kernels, name), counts, name))

    def launches(num_segments):
        gen = torch.Generator().manual_seed(num_segments)
        numels = torch.randint(1, 200, (num_segments,), generator=gen).tolist()
        table = SegmentTable.from_numels(numels, chunk=64).to(device)
        x = torch.randn(table.numel, device=device)
        ones = torch.ones(num_segments, device=device)
        per_call = []
        for call in (lambda: ops.segment_sq_norm(x, table, backend="triton"),
                     lambda: ops.accumulate_sq_norm_(x, x.clone(), table, None, backend="triton"),
                     lambda: ops.accumulate_sq_norm_(x, x.clone(), table, ones, backend="triton"),
                     lambda: ops.perturb_axpy_(x, x.clone(), ones, table, -1, backend="triton")):
            counts.clear()
            call()
            per_call.append(dict(counts))
        return per_call

    few, many = launches(3), launches(60)
    assert few == many
    assert [sum(c.values()) for c in few] == [2, 2, 2, 1]


def test_validation_names_the_argument(kernel_backend, device, arg_error):
    table = SegmentTable.from_numels([5, 7], chunk=4).to(device)
    x = torch.randn(12, device=device)
    scale = torch.ones(2, device=device)
    kw = {"backend": kernel_backend}
    with arg_error(ValueError, "x"):
        ops.segment_sq_norm(x.view(3, 4), table, **kw)
    with arg_error(ValueError, "x"):
        ops.segment_sq_norm(torch.randn(13, device=device), table, **kw)
    with arg_error(TypeError, "x"):
        ops.segment_sq_norm(x.double(), table, **kw)
    with arg_error(ValueError, "x"):
        ops.segment_sq_norm(torch.randn(24, device=device)[::2], table, **kw)
    with arg_error(ValueError, "table"):
        ops.segment_sq_norm(x, table.to("cpu" if device.type == "cuda" else "meta"), **kw)
    with arg_error(TypeError, "g"):
        ops.accumulate_sq_norm_(x, x.half(), table, **kw)
    with arg_error(TypeError, "beta"):
        ops.accumulate_sq_norm_(x, x.clone(), table, scale.double(), **kw)
    with arg_error(ValueError, "beta"):
        ops.accumulate_sq_norm_(x, x.clone(), table, torch.ones(3, device=device), **kw)
    with arg_error(ValueError, "scale"):
        ops.perturb_axpy_(x, x.clone(), torch.ones(1, device=device), table, 1, **kw)
    with arg_error(ValueError, "a"):
        ops.perturb_axpy_(x, torch.randn(11, device=device), scale, table, 1, **kw)
    with arg_error(ValueError, "sign"):
        ops.perturb_axpy_(x, x.clone(), scale, table, 0, **kw)


def test_backend_module_exposes_the_contract(kernel_backend):
    impl = dispatch.backend_module(kernel_backend, "weight_perturb")
    for name in ("segment_sq_norm", "accumulate_sq_norm_", "perturb_axpy_"):
        assert callable(getattr(impl, name))


# ----------------------------------------------------------------------------- fp16 / bf16 on GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_buffers(backend, device, dtype):
    """fp32 math rounded once on store, as the reference: axpy and a + g are bit-exact at any dtype, on
    every backend (no FMA contraction: see test_accumulate_sq_norm); norms are fp32 sums of the same stored
    values, so the fp32 tolerance holds."""
    # PreAct ResNet-18's perturbed weights: 11.2M elements in 21 tensors.
    shapes = [(64, 3, 3, 3)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1)] \
        + [(128, 128, 3, 3)] * 2 + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1)] \
        + [(256, 256, 3, 3)] * 2 + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1)] \
        + [(512, 512, 3, 3)] * 2 + [(10, 512)]
    table = SegmentTable.from_numels([torch.Size(s).numel() for s in shapes]).to(device)
    w = (torch.randn(table.numel, device=device) * 0.05).to(dtype)
    a = torch.randn(table.numel, device=device).to(dtype)
    g = torch.randn(table.numel, device=device).to(dtype)
    scale = torch.rand(table.num_segments, device=device) * 1e-3
    torch.testing.assert_close(ops.segment_sq_norm(w, table, backend=backend),
                               segment_sq_norm_ref(w, table.offsets), **NORM_TOL)
    a_ref, sq_ref = accumulate_sq_norm_ref(a, g, table.offsets, scale)
    sq = ops.accumulate_sq_norm_(a, g, table, scale, backend=backend)
    torch.testing.assert_close(sq, sq_ref, **NORM_TOL)
    expected = perturb_axpy_ref(w, a, scale, table.offsets, -1)
    ops.perturb_axpy_(w, a, scale, table, -1, backend=backend)
    assert torch.equal(a, a_ref) and torch.equal(w, expected)
