// Device helpers shared by the kernel files. These are dtype conversions, 16-byte packs and
// deterministic reductions. Only the .cu files include this header; bindings.cpp does not.
//
// Exactness. setup.py does not pass --use_fast_math. Fast math would add these:
//  * --ftz=true, which flushes fp32 subnormals to zero, where torch's CPU and CUDA kernels keep
//    them;
//  * approximate division and sqrt;
//  * fast exp and log.
// Any of these breaks the bit-exact fp32 ops, L∞ PGD and perturb_axpy. The kernels are
// memory-bound, so fast math would not buy any speed. nvcc still contracts a*b+c into an FMA by
// default (--fmad=true). The ops that must match the reference's rounding order therefore use the
// _rn intrinsics (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn), which are never contracted.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace rwp {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype conversions. The conversions round to nearest even, the same rounding as torch's
// .float() and .to(dtype). torch adds -D__CUDA_NO_HALF_CONVERSIONS__ and friends, so they are
// written out explicitly.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- 16-byte packs. One pack is one 128-bit load or store, LDG.128/STG.128. That is 4 fp32 or
// 8 fp16/bf16 elements.
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&f)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) f[k] = to_float<T>(pk.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(f[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// True when p can be read as a Pack<T, N>, which needs sizeof(T)·N-byte alignment.
template <typename T, int N>
__host__ __device__ __forceinline__ bool pack_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N)) == 0;
}

// ---- torch semantics for the elementwise pieces.
// torch.sign: +1, −1, and 0 for ±0 and for NaN. torch 2.14 on CPU returns 0 for NaN.
__device__ __forceinline__ float sign_f(float g) { return g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f); }

// torch.clamp(v, lo, hi) propagates NaN. fminf/fmaxf would drop it.
__device__ __forceinline__ float clamp_f(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ---- reductions. The order is fixed and does not depend on scheduling, so the results are the
// same from run to run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds at least 32 values. Every
// thread of the block must call this. It synchronizes, so `shared` can be used again straight
// after.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = lane < num_warps ? shared[lane] : T(0);
  total = warp_sum(total);  // every warp reduces the same values in the same order
  __syncthreads();          // `shared` can now be used again
  return total;
}

// A grid size for a grid-stride loop over `work` items with `threads` threads per block. 65535
// blocks cover 16.7M threads at 256 threads per block, far more than one wave on an H100 (132 SMs
// × 2048 threads). The loop covers the rest.
__host__ __forceinline__ unsigned grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535) blocks = 65535;
  return static_cast<unsigned>(blocks);
}

}  // namespace rwp
