// Fused PGD step and random start (SPEC.md §1). The oracle is rwp_fast/reference/pgd_step.py.
//
// L∞ is elementwise: one grid-stride pass that reads x_adv, grad and x_nat in 16-byte packs when
// all the pointers allow it, with a scalar loop for the numel % VEC tail. Each fp32 op is the same
// op, in the same order, as pgd_step_ref:
//     t = x_adv + (α·sign(g));  d = t − x_nat;  d = clamp(d, −ε, ε);  out = clamp(x_nat + d, 0, 1)
// So fp32 results are bit-exact. α·sign(g) is exact (sign ∈ {−1, 0, 1}), so an FMA of
// x_adv + α·sign(g) would even round the same way. The _rn intrinsics state the order anyway, so
// that no compiler flag can change it. See rwp_device.cuh for why there is no --use_fast_math.
//
// L2 uses one block per example, in three passes over the row:
//  1. ‖g‖² is block-reduced;
//  2. δ' = x_adv − x_nat + α·g/(‖g‖+1e-10) is formed and ‖δ'‖² block-reduced;
//  3. δ' is formed again and clamp(x_nat + δ'·min(1, ε/‖δ'‖), 0, 1) is written.
// Forming δ' again costs one more read of three rows. Keeping it would cost shared memory that
// grows with the row, and a CIFAR row is 3072 elements. The norms are fp32 block sums, so L2
// matches the reference to reduction-order rounding and not bit for bit.
//
// out may be x_adv itself. Each thread reads element i before it writes element i. In L2, pass 3
// starts only after the block barrier in pass 2's reduction, so every read of the row is done by
// then. That is why no pointer is __restrict__.
#include "rwp_device.cuh"
#include "rwp_kernels.h"

namespace rwp {
namespace {

constexpr int kThreads = 256;
constexpr float kL2GradEps = 1e-10f;  // L2_GRAD_EPS in the reference
constexpr float kNormFloor = 1e-30f;  // the clamp(min=1e-30) in the reference

__device__ __forceinline__ float linf_step(float xa, float g, float xn, float alpha, float eps) {
  const float t = __fadd_rn(xa, __fmul_rn(alpha, sign_f(g)));
  const float d = clamp_f(__fsub_rn(t, xn), -eps, eps);
  return clamp_f(__fadd_rn(xn, d), 0.f, 1.f);
}

// δ' = (x_adv − x_nat) + α·(g / den), in the reference's order.
__device__ __forceinline__ float l2_delta(float xa, float g, float xn, float alpha, float den) {
  return __fadd_rn(__fsub_rn(xa, xn), __fmul_rn(alpha, __fdiv_rn(g, den)));
}

// The row-norm floor in the reference, torch.clamp(n, min=1e-30): NaN passes through, as in torch.
__device__ __forceinline__ float norm_floor(float n) { return n < kNormFloor ? kNormFloor : n; }

// ---- L∞ step. V = 1 is the unaligned path, where every element takes the tail loop.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
pgd_step_linf_kernel(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t numel,
                     float alpha, float eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = V > 1 ? numel / V : 0;
  for (int64_t i = tid; i < num_packs; i += stride) {
    float xa[V], g[V], xn[V], o[V];
    load_pack<T, V>(x_adv + i * V, xa);
    load_pack<T, V>(grad + i * V, g);
    load_pack<T, V>(x_nat + i * V, xn);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = linf_step(xa[k], g[k], xn[k], alpha, eps);
    store_pack<T, V>(out + i * V, o);
  }
  for (int64_t i = num_packs * V + tid; i < numel; i += stride) {
    out[i] = from_float<T>(
        linf_step(to_float(x_adv[i]), to_float(grad[i]), to_float(x_nat[i]), alpha, eps));
  }
}

// ---- L2 step: one block per row. With V > 1, row_numel % V == 0 and the rows are aligned.
template <typename T, int V>
__global__ void __launch_bounds__(512)
pgd_step_l2_kernel(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t row_numel,
                   float alpha, float eps) {
  __shared__ float red[kWarp];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * row_numel;
  const T* xa_row = x_adv + base;
  const T* g_row = grad + base;
  const T* xn_row = x_nat + base;
  T* out_row = out + base;
  const int64_t num_packs = row_numel / V;

  float gsq = 0.f;
  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    float g[V];
    load_pack<T, V>(g_row + i * V, g);
#pragma unroll
    for (int k = 0; k < V; ++k) gsq = fmaf(g[k], g[k], gsq);
  }
  gsq = block_sum(gsq, red);
  const float den = __fadd_rn(__fsqrt_rn(gsq), kL2GradEps);

  float dsq = 0.f;
  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    float xa[V], g[V], xn[V];
    load_pack<T, V>(xa_row + i * V, xa);
    load_pack<T, V>(g_row + i * V, g);
    load_pack<T, V>(xn_row + i * V, xn);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = l2_delta(xa[k], g[k], xn[k], alpha, den);
      dsq = fmaf(d, d, dsq);
    }
  }
  dsq = block_sum(dsq, red);  // its barrier also orders pass 2's reads before pass 3's writes
  const float dn = __fsqrt_rn(dsq);
  const float shrink = dn > eps ? __fdiv_rn(eps, norm_floor(dn)) : 1.f;

  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    float xa[V], g[V], xn[V], o[V];
    load_pack<T, V>(xa_row + i * V, xa);
    load_pack<T, V>(g_row + i * V, g);
    load_pack<T, V>(xn_row + i * V, xn);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = __fmul_rn(l2_delta(xa[k], g[k], xn[k], alpha, den), shrink);
      o[k] = clamp_f(__fadd_rn(xn[k], d), 0.f, 1.f);
    }
    store_pack<T, V>(out_row + i * V, o);
  }
}

// ---- L∞ random start: clamp(x_nat + ε·noise, 0, 1), bit-exact in fp32 (ε·noise is rounded before
// the add, as in the reference).
template <typename T, typename TN, int V>
__global__ void __launch_bounds__(kThreads)
random_init_linf_kernel(const T* x_nat, const TN* noise, T* out, int64_t numel, float eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_packs = V > 1 ? numel / V : 0;
  for (int64_t i = tid; i < num_packs; i += stride) {
    float xn[V], nz[V], o[V];
    load_pack<T, V>(x_nat + i * V, xn);
    load_pack<TN, V>(noise + i * V, nz);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = clamp_f(__fadd_rn(xn[k], __fmul_rn(eps, nz[k])), 0.f, 1.f);
    store_pack<T, V>(out + i * V, o);
  }
  for (int64_t i = num_packs * V + tid; i < numel; i += stride) {
    out[i] = from_float<T>(
        clamp_f(__fadd_rn(to_float(x_nat[i]), __fmul_rn(eps, to_float(noise[i]))), 0.f, 1.f));
  }
}

// ---- L2 random start: one block per row. δ0 = noise/max(‖noise‖, 1e-30)·(r·ε).
template <typename T, typename TN, int V>
__global__ void __launch_bounds__(512)
random_init_l2_kernel(const T* x_nat, const TN* noise, const float* radius, T* out,
                      int64_t row_numel, float eps) {
  __shared__ float red[kWarp];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * row_numel;
  const T* xn_row = x_nat + base;
  const TN* nz_row = noise + base;
  T* out_row = out + base;
  const int64_t num_packs = row_numel / V;

  float nsq = 0.f;
  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    float nz[V];
    load_pack<TN, V>(nz_row + i * V, nz);
#pragma unroll
    for (int k = 0; k < V; ++k) nsq = fmaf(nz[k], nz[k], nsq);
  }
  nsq = block_sum(nsq, red);
  const float den = norm_floor(__fsqrt_rn(nsq));
  const float r_eps = __fmul_rn(radius[blockIdx.x], eps);

  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    float xn[V], nz[V], o[V];
    load_pack<T, V>(xn_row + i * V, xn);
    load_pack<TN, V>(nz_row + i * V, nz);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = __fmul_rn(__fdiv_rn(nz[k], den), r_eps);
      o[k] = clamp_f(__fadd_rn(xn[k], d), 0.f, 1.f);
    }
    store_pack<T, V>(out_row + i * V, o);
  }
}

// Block size for the row kernels. A CIFAR row (3072) is 12 elements a thread at 256 threads.
// From 8192 elements up (ImageNet-sized rows), 512 threads give each SM more loads in flight.
// There is one block per example, and a batch of 128 is about one block per SM on an H100.
int row_threads(int64_t row_numel) { return row_numel >= 8192 ? 512 : kThreads; }

}  // namespace

template <typename T>
cudaError_t pgd_step_linf(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t numel,
                          float alpha, float eps, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = pack_aligned<T, V>(x_adv) && pack_aligned<T, V>(grad) &&
                   pack_aligned<T, V>(x_nat) && pack_aligned<T, V>(out);
  if (vec) {
    pgd_step_linf_kernel<T, V><<<grid_for((numel + V - 1) / V, kThreads), kThreads, 0, stream>>>(
        x_adv, grad, x_nat, out, numel, alpha, eps);
  } else {
    pgd_step_linf_kernel<T, 1><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
        x_adv, grad, x_nat, out, numel, alpha, eps);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t pgd_step_l2(const T* x_adv, const T* grad, const T* x_nat, T* out, int64_t batch,
                        int64_t row_numel, float alpha, float eps, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = row_numel % V == 0 && pack_aligned<T, V>(x_adv) &&
                   pack_aligned<T, V>(grad) && pack_aligned<T, V>(x_nat) &&
                   pack_aligned<T, V>(out);
  const int threads = row_threads(row_numel);
  const dim3 grid(static_cast<unsigned>(batch));
  if (vec) {
    pgd_step_l2_kernel<T, V><<<grid, threads, 0, stream>>>(x_adv, grad, x_nat, out, row_numel,
                                                           alpha, eps);
  } else {
    pgd_step_l2_kernel<T, 1><<<grid, threads, 0, stream>>>(x_adv, grad, x_nat, out, row_numel,
                                                           alpha, eps);
  }
  return cudaGetLastError();
}

template <typename T, typename TN>
cudaError_t pgd_random_init_linf(const T* x_nat, const TN* noise, T* out, int64_t numel,
                                 float eps, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec =
      pack_aligned<T, V>(x_nat) && pack_aligned<TN, V>(noise) && pack_aligned<T, V>(out);
  if (vec) {
    random_init_linf_kernel<T, TN, V>
        <<<grid_for((numel + V - 1) / V, kThreads), kThreads, 0, stream>>>(x_nat, noise, out,
                                                                           numel, eps);
  } else {
    random_init_linf_kernel<T, TN, 1>
        <<<grid_for(numel, kThreads), kThreads, 0, stream>>>(x_nat, noise, out, numel, eps);
  }
  return cudaGetLastError();
}

template <typename T, typename TN>
cudaError_t pgd_random_init_l2(const T* x_nat, const TN* noise, const float* radius, T* out,
                               int64_t batch, int64_t row_numel, float eps, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec = row_numel % V == 0 && pack_aligned<T, V>(x_nat) &&
                   pack_aligned<TN, V>(noise) && pack_aligned<T, V>(out);
  const int threads = row_threads(row_numel);
  const dim3 grid(static_cast<unsigned>(batch));
  if (vec) {
    random_init_l2_kernel<T, TN, V><<<grid, threads, 0, stream>>>(x_nat, noise, radius, out,
                                                                  row_numel, eps);
  } else {
    random_init_l2_kernel<T, TN, 1><<<grid, threads, 0, stream>>>(x_nat, noise, radius, out,
                                                                  row_numel, eps);
  }
  return cudaGetLastError();
}

// The instantiations that bindings.cpp dispatches to. The noise is the image dtype, or fp32 as
// draw_random_init_noise makes it. For fp32 images those are the same instantiation.
#define RWP_INSTANTIATE_PGD(T)                                                                   \
  template cudaError_t pgd_step_linf<T>(const T*, const T*, const T*, T*, int64_t, float, float, \
                                        cudaStream_t);                                           \
  template cudaError_t pgd_step_l2<T>(const T*, const T*, const T*, T*, int64_t, int64_t, float, \
                                      float, cudaStream_t);                                      \
  template cudaError_t pgd_random_init_linf<T, T>(const T*, const T*, T*, int64_t, float,        \
                                                  cudaStream_t);                                 \
  template cudaError_t pgd_random_init_l2<T, T>(const T*, const T*, const float*, T*, int64_t,   \
                                                int64_t, float, cudaStream_t);
#define RWP_INSTANTIATE_PGD_F32_NOISE(T)                                                         \
  template cudaError_t pgd_random_init_linf<T, float>(const T*, const float*, T*, int64_t,       \
                                                      float, cudaStream_t);                      \
  template cudaError_t pgd_random_init_l2<T, float>(const T*, const float*, const float*, T*,    \
                                                    int64_t, int64_t, float, cudaStream_t);

RWP_INSTANTIATE_PGD(float)
RWP_INSTANTIATE_PGD(__half)
RWP_INSTANTIATE_PGD(__nv_bfloat16)
RWP_INSTANTIATE_PGD_F32_NOISE(__half)
RWP_INSTANTIATE_PGD_F32_NOISE(__nv_bfloat16)
#undef RWP_INSTANTIATE_PGD
#undef RWP_INSTANTIATE_PGD_F32_NOISE

}  // namespace rwp
