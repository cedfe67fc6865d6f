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
// Masked mean and count: a second launch of one block sums maskᵢ·ℓᵢ and maskᵢ over the B rows in
// a fixed order (each thread a fixed stride of rows, then the block tree), and divides by B, the
// whole batch, not the count (SPEC.md §2). Fixed order means the same bits on every run, which
// float atomics (added in the order blocks finish) do not give, and the outputs need no zero-fill
// launch: 2 launches a forward instead of 3. B is a training batch (128–1024), so the one block
// reads at most a few KB.
//
// As in the reference, the masked sum is ℓᵢ·float(maskᵢ) and the backward's coefficient is
// grad_out/B·float(maskᵢ). A NaN or inf ℓᵢ therefore makes masked_mean NaN even when that row is
// masked out, and its gradient row NaN where the reference's autograd gives 0·NaN.
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

constexpr int kReduceThreads = 256;

// p ≤ ℓ < q, strict upper bound. A NaN loss is outside every range.
__device__ __forceinline__ bool in_lsc_range(float loss, float p, float q) {
  return loss >= p && loss < q;
}

// One block: count = Σ maskᵢ and masked_mean = (Σ ℓᵢ·maskᵢ) / B, in a fixed order.
__global__ void __launch_bounds__(kReduceThreads)
lsc_masked_sum_kernel(const float* loss, const bool* mask, int64_t batch, int64_t* count,
                      float* masked_mean) {
  __shared__ float s_sum[kWarp];
  __shared__ int64_t s_cnt[kWarp];
  float sum = 0.f;
  int64_t cnt = 0;
  for (int64_t i = threadIdx.x; i < batch; i += kReduceThreads) {
    const bool v = mask[i];
    sum += loss[i] * (v ? 1.f : 0.f);  // a product, not a select: see the header
    cnt += v ? 1 : 0;
  }
  sum = block_sum(sum, s_sum);
  cnt = block_sum(cnt, s_cnt);
  if (threadIdx.x == 0) {
    *count = cnt;
    *masked_mean = __fdiv_rn(sum, static_cast<float>(batch));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lsc_fwd_kernel(const T* logits, const int64_t* target, int64_t batch, int64_t classes, float p,
               float q, float* loss_out, bool* mask_out, float* lse_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= batch) return;  // warp-uniform
  const T* z = logits + row * classes;
  float m = -INFINITY, s = 0.f;
  for (int64_t c = lane; c < classes; c += kWarp) lse_push(m, s, to_float(z[c]));
  const float lse = warp_lse(m, s);
  if (lane == 0) {
    const int64_t y = target[row];
    const float loss = (y >= 0 && y < classes) ? lse - to_float(z[y]) : NAN;
    loss_out[row] = loss;
    lse_out[row] = lse;
    mask_out[row] = in_lsc_range(loss, p, q);
  }
}

// dlogits = grad_out/B·maskᵢ·(softmax − onehot). grad_out/B is one fp32 division, as in the
// reference's autograd of sum()/n. A masked-out row gets 0·(softmax − onehot): zeros, or NaN where
// the row itself is NaN, as the reference.
template <typename T>
__global__ void __launch_bounds__(kThreads)
lsc_bwd_kernel(const float* grad_out, const T* logits, const int64_t* target, const float* lse,
               const bool* mask, int64_t batch, int64_t classes, T* dlogits) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= batch) return;
  T* d = dlogits + row * classes;
  const float coef = __fdiv_rn(*grad_out, static_cast<float>(batch)) * (mask[row] ? 1.f : 0.f);
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
                  float* lse_nat_out, float* lse_adv_out, float* kl_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= batch) return;  // warp-uniform
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
    const float loss = __fadd_rn(ce, __fmul_rn(beta, kl));  // ce + β·kl, the reference's order
    loss_out[row] = loss;
    lse_nat_out[row] = lse_nat;
    lse_adv_out[row] = lse_adv;
    kl_out[row] = kl;
    mask_out[row] = in_lsc_range(loss, p, q);
  }
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
  const float coef = __fdiv_rn(*grad_out, static_cast<float>(batch)) * (mask[row] ? 1.f : 0.f);
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

// The second launch of both forwards, after the row kernel on the same stream. A launch error
// of the row kernel is reported first.
cudaError_t masked_sum(const float* loss, const bool* mask, int64_t batch, int64_t* count,
                       float* masked_mean, cudaStream_t stream) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  lsc_masked_sum_kernel<<<1, kReduceThreads, 0, stream>>>(loss, mask, batch, count, masked_mean);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t lsc_loss_fwd(const T* logits, const int64_t* target, int64_t batch, int64_t classes,
                         float p, float q, float* loss, bool* mask, int64_t* count,
                         float* masked_mean, float* lse, cudaStream_t stream) {
  lsc_fwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(logits, target, batch, classes,
                                                                p, q, loss, mask, lse);
  return masked_sum(loss, mask, batch, count, masked_mean, stream);
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
                                float* loss, bool* mask, int64_t* count, float* masked_mean,
                                float* lse_nat, float* lse_adv, float* kl, cudaStream_t stream) {
  trades_fwd_kernel<T><<<row_blocks(batch), kThreads, 0, stream>>>(
      logits_nat, logits_adv, target, batch, classes, beta, p, q, loss, mask, lse_nat, lse_adv,
      kl);
  return masked_sum(loss, mask, batch, count, masked_mean, stream);
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
                                       float*, bool*, int64_t*, float*, float*, cudaStream_t);   \
  template cudaError_t lsc_loss_bwd<T>(const float*, const T*, const int64_t*, const float*,     \
                                       const bool*, int64_t, int64_t, T*, cudaStream_t);         \
  template cudaError_t lsc_loss_trades_fwd<T>(const T*, const T*, const int64_t*, int64_t,       \
                                              int64_t, float, float, float, float*, bool*,       \
                                              int64_t*, float*, float*, float*, float*,          \
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
