// Launchers of the fused rwp-fast CUDA kernels (SPEC.md §1-2), shared by the kernel files and by
// bindings.cpp.
//
// This header is plain CUDA runtime C++ and includes no torch header. Only bindings.cpp includes
// torch. On the 2-core CI machine (nvcc 13.0, sm_80 + sm_90) each .cu file compiles in 5-6 s.
// bindings.cpp takes 28 s, and an empty file that includes torch/extension.h alone takes 49 s.
// The kernels are what changes most often, so keep them cheap to rebuild.
//
// Conventions, the same for every launcher:
//  * T is the storage type of the floating tensors: float, __half or __nv_bfloat16. The .cu files
//    hold the explicit instantiations. bindings.cpp maps at::Half to __half and at::BFloat16 to
//    __nv_bfloat16; the two types in each pair have the same size and bit layout. There is no
//    float64: the Triton backend takes fp32/fp16/bf16 only, and the backends are interchangeable.
//  * The arithmetic is done in fp32 whatever T is, as in rwp_fast/reference. The values are
//    loaded, converted to float, computed, and rounded back to T (round to nearest even) on the
//    store. Reductions accumulate in fp32.
//  * The pointers are to contiguous device memory. bindings.cpp has checked the shapes, dtypes,
//    devices and contiguity, and skips the launch when there is nothing to do.
//  * A launcher enqueues on `stream` and returns cudaGetLastError(). It does not synchronize.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace rwp {

// ---------------------------------------------------------------------------------------------
// pgd_step (csrc/pgd_step.cu). x_adv, grad, x_nat and out have `numel` elements. For L2 they are
// `batch` rows of `row_numel` elements. out may be x_adv itself (an in-place step).
// ---------------------------------------------------------------------------------------------

// L∞: out = clamp(x_nat + clamp(x_adv + α·sign(g) − x_nat, −ε, ε), 0, 1). For fp32 this matches
// pgd_step_ref bit for bit.
template <typename T>
cudaError_t pgd_step_linf(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t numel,
                          float alpha, float eps, cudaStream_t stream);

// L2: δ' = x_adv − x_nat + α·g/(‖g‖+1e-10); out = clamp(x_nat + δ'·min(1, ε/‖δ'‖), 0, 1), with
// one norm per row.
template <typename T>
cudaError_t pgd_step_l2(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t batch,
                        int64_t row_numel, float alpha, float eps, cudaStream_t stream);

// L∞ random start: out = clamp(x_nat + ε·noise, 0, 1). TN, the noise type, is float or T.
template <typename T, typename TN>
cudaError_t pgd_random_init_linf(const T* x_nat, const TN* noise, T* out, int64_t numel,
                                 float eps, cudaStream_t stream);

// L2 random start: out = clamp(x_nat + noise/max(‖noise‖, 1e-30)·(radius_b·ε), 0, 1), one norm
// per row. radius is (batch,) fp32.
template <typename T, typename TN>
cudaError_t pgd_random_init_l2(const T* x_nat, const TN* noise, const float* radius, T* out,
                               int64_t batch, int64_t row_numel, float eps, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// lsc_loss (csrc/lsc_loss.cu). logits is (batch, classes) row-major and target is (batch,) int64.
// The mask is p ≤ ℓᵢ < q. count (int64) and masked_mean (fp32) are single elements, written by a
// second, one-block launch that sums the rows in a fixed order. masked_mean = Σ maskᵢ·ℓᵢ / batch,
// a mean over the whole batch and not over the masked rows. A target outside [0, classes) gives
// ℓᵢ = NaN, so that row is never masked in.
// ---------------------------------------------------------------------------------------------

template <typename T>
cudaError_t lsc_loss_fwd(const T* logits, const int64_t* target, int64_t batch, int64_t classes,
                         float p, float q, float* loss, bool* mask, int64_t* count,
                         float* masked_mean, float* lse, cudaStream_t stream);

// dlogits = grad_out·maskᵢ/batch·(softmax − onehot). grad_out is one fp32 on the device, read
// there, so that the host never has to synchronize.
template <typename T>
cudaError_t lsc_loss_bwd(const float* grad_out, const T* logits, const int64_t* target,
                         const float* lse, const bool* mask, int64_t batch, int64_t classes,
                         T* dlogits, cudaStream_t stream);

// TRADES: ℓᵢ = CE(z_natᵢ, yᵢ) + β·klᵢ, where klᵢ = Σ_c p_nat,c (log p_nat,c − log p_adv,c).
template <typename T>
cudaError_t lsc_loss_trades_fwd(const T* logits_nat, const T* logits_adv, const int64_t* target,
                                int64_t batch, int64_t classes, float beta, float p, float q,
                                float* loss, bool* mask, int64_t* count, float* masked_mean,
                                float* lse_nat, float* lse_adv, float* kl, cudaStream_t stream);

// With cᵢ = grad_out·maskᵢ/batch:
//   d_nat = cᵢ·[(p_nat − onehot) + β·p_nat⊙(log p_nat − log p_adv − klᵢ)]
//   d_adv = cᵢ·β·(p_adv − p_nat)
template <typename T>
cudaError_t lsc_loss_trades_bwd(const float* grad_out, const T* logits_nat, const T* logits_adv,
                                const int64_t* target, const float* lse_nat, const float* lse_adv,
                                const float* kl, const bool* mask, int64_t batch, int64_t classes,
                                float beta, T* d_nat, T* d_adv, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// weight_perturb (csrc/weight_perturb.cu). One flat buffer of `numel` elements is split into
// L = num_segments segments: segment l is [offsets[l], offsets[l+1]). The segments are cut into
// M = num_chunks chunks of at most `chunk` elements, and no chunk straddles two segments. Chunk m
// starts at chunk_start[m] inside segment chunk_seg[m]. The chunks of segment l are
// [seg_chunk_start[l], seg_chunk_start[l+1]), in buffer order. The number of launches does not
// depend on L:
//   * one launch for the elementwise ops;
//   * two for the norms, a per-chunk partial Σx² and then a per-segment finalize.
// The finalize sums the chunks of a segment in a fixed order and uses no float atomics, so the
// norms are deterministic from run to run.
// ---------------------------------------------------------------------------------------------

struct SegmentTableView {
  const int64_t* offsets;          // (L+1,)
  const int32_t* chunk_seg;        // (M,)
  const int64_t* chunk_start;      // (M,)
  const int32_t* seg_chunk_start;  // (L+1,)
  int64_t num_segments;            // L
  int64_t num_chunks;              // M, < 2^31 (one block per chunk)
  int64_t numel;                   // N; the kernels never touch an element at or past N
  int64_t chunk;                   // CHUNK, > 0
};

// out[l] = Σ x² over segment l (fp32). partial is an (M,) fp32 scratch buffer.
template <typename T>
cudaError_t segment_sq_norm(const T* x, const SegmentTableView& table, float* partial, float* out,
                            cudaStream_t stream);

// In place: a ← β_l·a + g (a ← a + g when beta is null). Then out[l] = Σ a² of the new a as
// stored, after the rounding to T.
template <typename T>
cudaError_t accumulate_sq_norm(T* a, const T* g, const float* beta, const SegmentTableView& table,
                               float* partial, float* out, cudaStream_t stream);

// In place: w ← w + sign·(scale_l·a). sign is +1 or −1. For every T this matches
// perturb_axpy_ref bit for bit.
template <typename T>
cudaError_t perturb_axpy(T* w, const T* a, const float* scale, const SegmentTableView& table,
                         int sign, cudaStream_t stream);

}  // namespace rwp
