// Segmented norms and w ± s·a over one flat weight buffer (SPEC.md §2). The oracle is
// rwp_fast/reference/weight_perturb.py; rwp_kernels.h describes the chunk table.
//
// One block per chunk of at most CHUNK elements. A block reads its segment from chunk_seg, so one
// launch covers all L segments. Inside a chunk, the block reads 16-byte packs when the chunk start
// is aligned for every pointer involved, with a scalar loop for the tail. A chunk starts at a
// segment offset plus a multiple of CHUNK. So a segment whose offset is a multiple of 4 elements
// (fp32) or 8 (fp16/bf16) is read in packs, and conv and linear weights nearly always are.
//
// Norms: pass 1 writes one fp32 partial Σx² per chunk to an (M,) scratch buffer. Pass 2 has one warp
// per segment, which sums that segment's partials in a fixed order: lane j takes chunks j, j+32, …
// and a butterfly combines the lanes. There are no float atomics and no dependence on scheduling,
// so the norms are the same from run to run. That is two launches, whatever L is.
//
// perturb_axpy_ is bit-exact against the reference for every dtype. It computes step = s·a with
// __fmul_rn, then w + step or w − step with __fadd_rn or __fsub_rn, then rounds once to T. An FMA
// would skip the rounding of s·a and change the last bit.
#include "rwp_device.cuh"
#include "rwp_kernels.h"

namespace rwp {
namespace {

// 256 threads over a 4096-element chunk: 4 fp32 packs per thread.
constexpr int kThreads = 256;

struct ChunkRange {
  int64_t start, end;
  int seg;
};

// The chunk's [start, end). It is clamped to its segment and to numel, so a table that does not
// match the buffer cannot make a block read or write out of bounds.
__device__ __forceinline__ ChunkRange chunk_range(const SegmentTableView& t, int64_t m) {
  ChunkRange r;
  r.seg = t.chunk_seg[m];
  r.start = t.chunk_start[m];
  int64_t end = r.start + t.chunk;
  const int64_t seg_end = t.offsets[r.seg + 1];
  if (end > seg_end) end = seg_end;
  if (end > t.numel) end = t.numel;
  r.end = end > r.start ? end : r.start;
  return r;
}

// Pass 1 of the norms. kAccumulate = false reads x and sums x². kAccumulate = true first stores
// x ← β·x + g (or x + g when beta is null, with no multiply, as in the reference). It then sums
// the squares of the values as stored, after the rounding to T.
template <typename T, bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
chunk_sq_kernel(T* x, const T* g, const float* beta, SegmentTableView table, float* partial) {
  __shared__ float red[kWarp];
  constexpr int V = VecWidth<T>::value;
  const int64_t m = blockIdx.x;
  const ChunkRange r = chunk_range(table, m);
  const float b = (kAccumulate && beta != nullptr) ? beta[r.seg] : 1.f;

  auto update = [&](float xv, float gv) -> float {
    const float v = beta != nullptr ? __fadd_rn(__fmul_rn(b, xv), gv) : __fadd_rn(xv, gv);
    return to_float(from_float<T>(v));  // the value as stored
  };

  float acc = 0.f;
  const bool vec = pack_aligned<T, V>(x + r.start) && (!kAccumulate || pack_aligned<T, V>(g + r.start));
  const int64_t num_packs = vec ? (r.end - r.start) / V : 0;
  for (int64_t j = threadIdx.x; j < num_packs; j += blockDim.x) {
    const int64_t i = r.start + j * V;
    float xv[V];
    load_pack<T, V>(x + i, xv);
    if constexpr (kAccumulate) {
      float gv[V];
      load_pack<T, V>(g + i, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) xv[k] = update(xv[k], gv[k]);
      store_pack<T, V>(x + i, xv);  // xv is exact in T, so the store rounds nothing
    }
#pragma unroll
    for (int k = 0; k < V; ++k) acc = fmaf(xv[k], xv[k], acc);
  }
  for (int64_t i = r.start + num_packs * V + threadIdx.x; i < r.end; i += blockDim.x) {
    float xv = to_float(x[i]);
    if constexpr (kAccumulate) {
      xv = update(xv, to_float(g[i]));
      x[i] = from_float<T>(xv);
    }
    acc = fmaf(xv, xv, acc);
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[m] = acc;
}

// Pass 2 of the norms: one warp per segment. The sum order is fixed.
constexpr int kFinalizeWarps = 8;

__global__ void __launch_bounds__(kFinalizeWarps * kWarp)
segment_finalize_kernel(const float* partial, const int32_t* seg_chunk_start, int64_t num_segments,
                        float* out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + threadIdx.x / kWarp;
  if (seg >= num_segments) return;  // warp-uniform
  const int32_t first = seg_chunk_start[seg], last = seg_chunk_start[seg + 1];
  float acc = 0.f;
  for (int32_t c = first + lane; c < last; c += kWarp) acc += partial[c];
  acc = warp_sum(acc);
  if (lane == 0) out[seg] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
perturb_axpy_kernel(T* w, const T* a, const float* scale, SegmentTableView table, int sign) {
  constexpr int V = VecWidth<T>::value;
  const ChunkRange r = chunk_range(table, blockIdx.x);
  const float s = scale[r.seg];
  auto axpy = [&](float wv, float av) -> float {
    const float step = __fmul_rn(s, av);
    return sign > 0 ? __fadd_rn(wv, step) : __fsub_rn(wv, step);
  };
  const bool vec = pack_aligned<T, V>(w + r.start) && pack_aligned<T, V>(a + r.start);
  const int64_t num_packs = vec ? (r.end - r.start) / V : 0;
  for (int64_t j = threadIdx.x; j < num_packs; j += blockDim.x) {
    const int64_t i = r.start + j * V;
    float wv[V], av[V];
    load_pack<T, V>(w + i, wv);
    load_pack<T, V>(a + i, av);
#pragma unroll
    for (int k = 0; k < V; ++k) wv[k] = axpy(wv[k], av[k]);
    store_pack<T, V>(w + i, wv);
  }
  for (int64_t i = r.start + num_packs * V + threadIdx.x; i < r.end; i += blockDim.x) {
    w[i] = from_float<T>(axpy(to_float(w[i]), to_float(a[i])));
  }
}

cudaError_t finalize(const float* partial, const SegmentTableView& t, float* out,
                     cudaStream_t stream) {
  if (t.num_segments == 0) return cudaSuccess;  // a launch of 0 blocks is an error
  const int64_t blocks = (t.num_segments + kFinalizeWarps - 1) / kFinalizeWarps;
  segment_finalize_kernel<<<static_cast<unsigned>(blocks), kFinalizeWarps * kWarp, 0, stream>>>(
      partial, t.seg_chunk_start, t.num_segments, out);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t segment_sq_norm(const T* x, const SegmentTableView& table, float* partial, float* out,
                            cudaStream_t stream) {
  if (table.num_chunks > 0) {
    // The kernel writes x only when kAccumulate is true; the const_cast is there for the shared code.
    chunk_sq_kernel<T, false><<<static_cast<unsigned>(table.num_chunks), kThreads, 0, stream>>>(
        const_cast<T*>(x), nullptr, nullptr, table, partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finalize(partial, table, out, stream);
}

template <typename T>
cudaError_t accumulate_sq_norm(T* a, const T* g, const float* beta, const SegmentTableView& table,
                               float* partial, float* out, cudaStream_t stream) {
  if (table.num_chunks > 0) {
    chunk_sq_kernel<T, true><<<static_cast<unsigned>(table.num_chunks), kThreads, 0, stream>>>(
        a, g, beta, table, partial);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return finalize(partial, table, out, stream);
}

template <typename T>
cudaError_t perturb_axpy(T* w, const T* a, const float* scale, const SegmentTableView& table,
                         int sign, cudaStream_t stream) {
  if (table.num_chunks > 0) {
    perturb_axpy_kernel<T><<<static_cast<unsigned>(table.num_chunks), kThreads, 0, stream>>>(
        w, a, scale, table, sign);
  }
  return cudaGetLastError();
}

#define RWP_INSTANTIATE_WP(T)                                                                     \
  template cudaError_t segment_sq_norm<T>(const T*, const SegmentTableView&, float*, float*,     \
                                          cudaStream_t);                                         \
  template cudaError_t accumulate_sq_norm<T>(T*, const T*, const float*, const SegmentTableView&, \
                                             float*, float*, cudaStream_t);                      \
  template cudaError_t perturb_axpy<T>(T*, const T*, const float*, const SegmentTableView&, int,  \
                                       cudaStream_t);

RWP_INSTANTIATE_WP(float)
RWP_INSTANTIATE_WP(__half)
RWP_INSTANTIATE_WP(__nv_bfloat16)
#undef RWP_INSTANTIATE_WP

}  // namespace rwp
