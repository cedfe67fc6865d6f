"""Every backend on inputs whose data start one element past an allocation, so that no pointer is 16-byte
aligned: the kernels' scalar path (their vector path needs aligned pointers). The results are the
reference's, as for aligned inputs: bit-exact where the ops are (L∞ step and start, a ← β·a + g, w ± s·a)."""

import pytest
import torch

from kernel_helpers import poison_cuda_allocator, unaligned
from rwp_fast import ops
from rwp_fast.ops.weight_perturb import SegmentTable
from rwp_fast.reference.pgd_step import pgd_random_init_ref, pgd_step_ref
from rwp_fast.reference.weight_perturb import accumulate_sq_norm_ref, perturb_axpy_ref, segment_sq_norm_ref
from rwp_fast.verify import tolerances

# fp16/bf16 only on a GPU: the Triton interpreter has no bf16 (conftest)
DTYPES = [torch.float32] + [pytest.param(d, marks=pytest.mark.gpu) for d in (torch.float16, torch.bfloat16)]
RADII = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 15 / 255)}  # norm: (ε, α)
# Row lengths 75 and 147 are not multiples of the 4- or 8-element pack, so the scalar tail runs too;
# (7, 1) has one element per row.
PGD_SHAPES = [(1, 3, 5, 5), (129, 3, 7, 7), (7, 1)]
# A 1-element segment first, so every later segment starts at an odd offset (unaligned chunks); sizes that
# are not multiples of the chunk, and segments of several chunks.
WP_LAYOUTS = {"default_chunk": ([1, 37, 4101, 8192, 3], 4096), "small_chunk": ([300, 1, 64, 65, 129, 1000, 2], 64)}


def _l2_atol(dtype):
    # fp32: the norms' fp32 sums in another order (tolerances.PGD_L2_ATOL). fp16/bf16 outputs in [0, 1] may
    # then round one ulp apart, and one ulp there is at most finfo.eps.
    return tolerances.PGD_L2_ATOL if dtype == torch.float32 else torch.finfo(dtype).eps


def _pgd_inputs(shape, device, dtype, eps):
    """x_nat in [0, 1]; x_adv up to 1.5·ε away, so the projection clips; grad with exact zeros."""
    x_nat = torch.rand(shape, device=device)
    x_adv = (x_nat + (torch.rand(shape, device=device) * 3 - 1.5) * eps).clamp(0, 1)
    grad = torch.randn(shape, device=device)
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def _assert_matches(out, expected, norm):
    if norm == "linf":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=_l2_atol(out.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step(backend, device, norm, shape, dtype):
    eps, alpha = RADII[norm]
    x_adv, grad, x_nat = (unaligned(t) for t in _pgd_inputs(shape, device, dtype, eps))
    expected = pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm)
    out = ops.pgd_step(x_adv, grad, x_nat, alpha, eps, norm, out=torch.full_like(x_adv, float("nan")),
                       backend=backend)
    _assert_matches(out, expected, norm)
    in_place = unaligned(x_adv)
    ops.pgd_step_(in_place, grad, x_nat, alpha, eps, norm, backend=backend)
    _assert_matches(in_place, expected, norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_random_init(backend, device, norm, shape, dtype):
    """L∞: ε·noise rounded, then added, the reference's two fp32 ops, so bit-exact on every backend (the
    CUDA kernels use __fmul_rn/__fadd_rn, which nvcc never contracts into an FMA). L2: as the L2 step."""
    eps, _ = RADII[norm]
    x_nat = unaligned(torch.rand(shape, device=device).to(dtype))
    if norm == "linf":
        noise, radius = torch.rand(shape, device=device) * 2 - 1, None
    else:
        noise, radius = torch.randn(shape, device=device), torch.rand(shape[0], device=device)
    noise = unaligned(noise)
    out = ops.pgd_random_init(x_nat, noise, eps, norm, radius, backend=backend)
    _assert_matches(out, pgd_random_init_ref(x_nat, noise, eps, norm, radius), norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(WP_LAYOUTS))
def test_weight_perturb(backend, device, layout, dtype):
    numels, chunk = WP_LAYOUTS[layout]
    table = SegmentTable.from_numels(numels, chunk).to(device)
    w = unaligned((torch.randn(table.numel, device=device) * 0.05).to(dtype))
    a = unaligned(torch.randn(table.numel, device=device).to(dtype))
    g = unaligned(torch.randn(table.numel, device=device).to(dtype))
    beta = torch.rand(table.num_segments, device=device)
    scale = torch.rand(table.num_segments, device=device) * 1e-2

    poison_cuda_allocator(device)
    sq = ops.segment_sq_norm(w, table, backend=backend)
    torch.testing.assert_close(sq, segment_sq_norm_ref(w, table.offsets), **tolerances.NORM_TOL)
    for b in (None, beta):
        a_ref, sq_ref = accumulate_sq_norm_ref(a, g, table.offsets, b)
        poison_cuda_allocator(device)
        sq = ops.accumulate_sq_norm_(a, g, table, b, backend=backend)
        assert torch.equal(a, a_ref)  # β·a + g: the reference's fp32 ops, rounded once to dtype
        torch.testing.assert_close(sq, sq_ref, **tolerances.NORM_TOL)
    for sign in (1, -1):
        expected = perturb_axpy_ref(w, a, scale, table.offsets, sign)
        ops.perturb_axpy_(w, a, scale, table, sign, backend=backend)
        assert torch.equal(w, expected)  # s·a rounded, then added: bit-exact at every dtype
