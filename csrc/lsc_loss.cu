// Per-example loss with the Loss Stationary Condition mask (SPEC.md §2). The oracle is
// rwp_fast/reference/lsc_loss.py.
//
// Layout: one warp per row, 4 rows (128 threads) per block. Each lane walks the row with a stride
// of 32. It keeps an online (max, Σexp) pair, so any C is one read of the logits. The warp then
// merges the 32 pairs with a butterfly.
// One warp suits the C of this project, which is 10 for CIFAR-10/SVHN and 100 for CIFAR-100;
// C = 1000 is 32 iterations a lane. The whole (B, C) problem is under 1 MB, so launch latency
// dominates, not the row layout.
//
// Masked mean: each block sums Σ maskᵢ·ℓᵢ over its rows and does one atomicAdd of sum/B, and one
// atomicAdd of its count. The caller zeroes both outputs. masked_mean is divided by B, the whole
// batch, not by the count (SPEC.md §2). The float atomics make the last bits of masked_mean depend
// on the order in which blocks finish, within B/4 additions of fp32 rounding. Only
// per-example ℓᵢ, lse and mask are bit-stable from run to run.
//
// As in the reference, the masked sum is ℓᵢ·float(maskᵢ). A NaN or inf ℓᵢ therefore makes
// masked_mean NaN even when that row is masked out.
#include <cmath>

#include "rwp_device.cuh"
#include "rwp_kernels.h"

namespace rwp {
namespace {

constexpr int kRowsPerBlock = 4;
constexpr int kThreads = kRowsPerBlock * kWarp;

// Online log-sum-exp state. m is the running max and s = Σ exp(x − m). A −inf element adds 0.
// Without the guard, −inf − (−inf) would give NaN. A NaN element makes s NaN, as in torch.
__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // first element: m = −inf, so s = 0·0 + 1
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) {  // both empty so far: s and s2 are 0
    s += s2;
    return;
  }
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

// The lse of the warp's row, given to every lane. Lane 0's value is broadcast, so that every lane
// uses the same bits. Under FMA contraction the butterfly's two partners can round differently.
__device__ __forceinline__ float warp_lse(float m, float s) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o);
    const float s2 = __shfl_xor_sync(kFullMask, s, o);
    lse_merge(m, s, m2, s2);
  }
  return __shfl_sync(kFullMask, m + logf(s), 0);
}

// The mask and the block's share of count and masked_mean. Lane 0 of each warp brings its row's
// loss; rows past B bring valid = false. Every thread of the block must call this.
__device__ __forceinline__ void mask_and_accumulate(float loss, bool valid, float p, float q,
                                                    int64_t batch, bool* mask_out, int64_t row,
                                                    int32_t* count, float* masked_mean) {
  __shared__ float s_sum[kRowsPerBlock];
  __shared__ int s_cnt[kRowsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    const bool in_range = valid && loss >= p && loss < q;  // p ≤ ℓ < q, strict upper bound
    if (valid) mask_out[row] = in_range;
    s_sum[warp] = valid ? loss * (in_range ? 1.f : 0.f) : 0.f;
    s_cnt[warp] = in_range ? 1 : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    int cnt = 0;
#pragma unroll
    for (int w = 0; w < kRowsPerBlock; ++w) {
      sum += s_sum[w];
      cnt += s_cnt[w];
    }
    if (cnt != 0) atomicAdd(count, cnt);
    // sum != 0 lets a NaN through (NaN != 0 is true) and skips only exact zeros.
    if (sum != 0.f) atomicAdd(masked_mean, __fdiv_rn(sum, static_cast<float>(batch)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lsc_fwd_kernel(const T* logits, const int64_t* target, int64_t batch, int64_t classes, float p,
               float q, float* loss_out, bool* mask_out, int32_t* count, float* masked_mean,
               float* lse_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const bool valid = row < batch;
  float loss = 0.f;
  if (valid) {  // warp-uniform
    const T* z = logits + row * classes;
    float m = -INFINITY, s = 0.f;
    for (int64_t c = lane; c < classes; c += kWarp) lse_push(m, s, to_float(z[c]));
    const float lse = warp_lse(m, s);
    if (lane == 0) {
      const int64_t y = target[row];
      loss = (y >= 0 && y < classes) ? lse - to_float(z[y]) : NAN;
      loss_out[row] = loss;
      lse_out[row] = lse;
    }
  }
  mask_and_accumulate(loss, valid, p, q, batch, mask_out, row, count, masked_mean);
}

// dlogits = grad_out/B·maskᵢ·(softmax − onehot). grad_out/B is one fp32 division, as in the
// reference's autograd of sum()/n. A masked-out row gets zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads)
lsc_bwd_kernel(const float* grad_out, const T* logits, const int64_t* target, const float* lse,
               const bool* mask, int64_t batch, int64_t classes, T* dlogits) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= batch) return;
  T* d = dlogits + row * classes;
  if (!mask[row]) {
    for (int64_t c = lane; c < classes; c += kWarp) d[c] = from_float<T>(0.f);
    return;
  }
  const float coef = __fdiv_rn(*grad_out, static_cast<float>(batch));
  const float row_lse = lse[row];
  const int64_t y = target[row];
  const T* z = logits + row * classes;
  for (int64_t c = lane; c < classes; c += kWarp) {
    const float prob = expf(to_float(z[c]) - row_lse);
    d[c] = from_float<T>(coef * (prob - (c == y ? 1.f : 0.f)));
  }
}

// TRADES: ℓᵢ = CE(z_nat, y) + β·Σ_c p_nat,c (log p_nat,c − log p_adv,c). Pass 1 walks both rows
// for the two lses. Pass 2 walks them again for kl; the rows are back in L1/L2 by then.
template <typename T>
__global__ void __launch_bounds__(kThreads)
trades_fwd_kernel(const T* logits_nat, const T* logits_adv, const int64_t* target, int64_t batch,
                  int64_t classes, float beta, float p, float q, float* loss_out, bool* mask_out,
                  int32_t* count, float* masked_mean, float* lse_nat_out, float* lse_adv_out,
                  float* kl_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const bool valid = row < batch;
  float loss = 0.f;
  if (valid) {
    const T* zn = logits_nat + row * classes;
    const T* za = logits_adv + row * classes;
    float mn = -INFINITY, sn = 0.f, ma = -INFINITY, sa = 0.f;
    for (int64_t c = lane; c < classes; c += kWarp) {
      lse_push(mn, sn, to_float(zn[c]));
      lse_push(ma, sa, to_float(za[c]));
    }
    const float lse_nat = warp_lse(mn, sn);
    const float lse_adv = warp_lse(ma, sa);
    float kl = 0.f;
    for (int64_t c = lane; c < classes; c += kWarp) {
      const float log_p_nat = to_float(zn[c]) - lse_nat;
      const float log_p_adv = to_float(za[c]) - lse_adv;
      kl += expf(log_p_nat) * (log_p_nat - log_p_adv);
    }
    kl = __shfl_sync(kFullMask, warp_sum(kl), 0);
    if (lane == 0) {
      const int64_t y = target[row];
      const float ce = (y >= 0 && y < classes) ? lse_nat - to_float(zn[y]) : NAN;
      loss = __fadd_rn(ce, __fmul_rn(beta, kl));  // ce + β·kl, the reference's order
      loss_out[row] = loss;
      lse_nat_out[row] = lse_nat;
      lse_adv_out[row] = lse_adv;
      kl_out[row] = kl;
    }
  }
  mask_and_accumulate(loss, valid, p, q, batch, mask_out, row, count, masked_mean);
}

// With cᵢ = grad_out/B·maskᵢ:
//   d_nat = cᵢ·[(p_nat − onehot) + β·p_nat·(log p_nat − log p_adv − klᵢ)]
//   d_adv = cᵢ·β·(p_adv − p_nat)
template <typename T>
__global__ void __launch_bounds__(kThreads)
trades_bwd_kernel(const float* grad_out, const T* logits_nat, const T* logits_adv,
                  const int64_t* target, const float* lse_nat, const float* lse_adv,
                  const float* kl, const bool* mask, int64_t batch, int64_t classes, float beta,
                  T* d_nat, T* d_adv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= batch) return;
  T* dn = d_nat + row * classes;
  T* da = d_adv + row * classes;
  if (!mask[row]) {
    for (int64_t c = lane; c < classes; c += kWarp) {
      dn[c] = from_float<T>(0.f);
      da[c] = from_float<T>(0.f);
    }
    return;
  }
  const float coef = __fdiv_rn(*grad_out, static_cast<float>(batch));
  const float ln = lse_nat[row], la = lse_adv[row], row_kl = kl[row];
  const int64_t y = target[row];
  const T* zn = logits_nat + row * classes;
  const T* za = logits_adv + row * classes;
  for (int64_t c = lane; c < classes; c += kWarp) {
    const float log_p_nat = to_float(zn[c]) - ln;
    const float log_p_adv = to_float(za[c]) - la;
    const float p_nat = expf(log_p_nat);
    const float p_adv = expf(log_p_adv);
    const float ce_grad = p_nat - (c == y ? 1.f : 0.f);
    const float kl_grad = p_nat * (log_p_nat - log_p_adv - row_kl);
    dn[c] = from_float<T>(coef * (ce_grad + beta * kl_grad));
    da[c] = from_float<T>(coef * (beta * (p_adv - p_nat)));
  }
}

unsigned row_blocks(int64_t batch) {
  return static_cast<unsigned>((batch + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

template <typename T>
cudaError_t lsc_loss_fwd(const T* logits, const int64_t* target, int64_t batch, int64_t classes,
                         float p, float q, float* loss, bool* mask, int32_t* count,
                         float* masked_mean, float* lse, cudaStream_t stream) {
  lsc_fwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(
      logits, target, batch, classes, p, q, loss, mask, count, masked_mean, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lsc_loss_bwd(const float* grad_out, const T* logits, const int64_t* target,
                         const float* lse, const bool* mask, int64_t batch, int64_t classes,
                         T* dlogits, cudaStream_t stream) {
  lsc_bwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(grad_out, logits, target, lse,
                                                                mask, batch, classes, dlogits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lsc_loss_trades_fwd(const T* logits_nat, const T* logits_adv, const int64_t* target,
                                int64_t batch, int64_t classes, float beta, float p, float q,
                                float* loss, bool* mask, int32_t* count, float* masked_mean,
                                float* lse_nat, float* lse_adv, float* kl, cudaStream_t stream) {
  trades_fwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(
      logits_nat, logits_adv, target, batch, classes, beta, p, q, loss, mask, count, masked_mean,
      lse_nat, lse_adv, kl);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lsc_loss_trades_bwd(const float* grad_out, const T* logits_nat, const T* logits_adv,
                                const int64_t* target, const float* lse_nat, const float* lse_adv,
                                const float* kl, const bool* mask, int64_t batch, int64_t classes,
                                float beta, T* d_nat, T* d_adv, cudaStream_t stream) {
  trades_bwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(
      grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask, batch, classes, beta,
      d_nat, d_adv);
  return cudaGetLastError();
}

#define RWP_INSTANTIATE_LSC(T)                                                                    \
  template cudaError_t lsc_loss_fwd<T>(const T*, const int64_t*, int64_t, int64_t, float, float, \
                                       float*, bool*, int32_t*, float*, float*, cudaStream_t);   \
  template cudaError_t lsc_loss_bwd<T>(const float*, const T*, const int64_t*, const float*,     \
                                       const bool*, int64_t, int64_t, T*, cudaStream_t);         \
  template cudaError_t lsc_loss_trades_fwd<T>(const T*, const T*, const int64_t*, int64_t,       \
                                              int64_t, float, float, float, float*, bool*,       \
                                              int32_t*, float*, float*, float*, float*,          \
                                              cudaStream_t);                                     \
  template cudaError_t lsc_loss_trades_bwd<T>(const float*, const T*, const T*, const int64_t*,  \
                                              const float*, const float*, const float*,          \
                                              const bool*, int64_t, int64_t, float, T*, T*,      \
                                              cudaStream_t);

RWP_INSTANTIATE_LSC(float)
RWP_INSTANTIATE_LSC(__half)
RWP_INSTANTIATE_LSC(__nv_bfloat16)
#undef RWP_INSTANTIATE_LSC

}  // namespace rwp
