// fused_norm.cu -- RMSNorm, optionally fused with the residual add that precedes it.
//
// Computes, per row t of `hidden` values (fp32 arithmetic, model-dtype storage):
//     r[t]  = x[t] + residual[t]                       (rounded to the dtype; skipped: r = x)
//     y[t]  = weight * dtype( r[t] / sqrt(mean(r[t]^2) + eps) )
// and writes y and (with a residual) r, the new residual stream. One launch replaces the add and the
// five or so elementwise/reduction launches of the unfused norm, and r is read from memory once.
// The rounding follows the reference op by op (see fused.cuh), so only the sum of squares differs
// from it in summation order.
//
// Memory layout: x, residual (T, hidden) with any row stride, unit-stride rows; weight (hidden,);
// y and r contiguous (T, hidden). fp32, fp16 or bf16, all the same dtype.
//
// Launch shape: one CTA per row (grid = T, from the shape only: CUDA-graph safe), up to 512 threads.
// Each thread handles 16-byte vectors (8 bf16/fp16 or 4 fp32 values) strided by the block size --
// consecutive threads read consecutive vectors, so every load coalesces. Up to kCached vectors per
// thread stay in registers between the two passes (sum of squares, then normalise); that covers
// hidden <= 512 * 4 vectors = 16384 bf16 / 8192 fp32 values. Wider rows re-read r from memory (the
// same thread's own writes, still in L1/L2) for the vectors beyond that. Rows whose length or
// addresses are not 16-byte aligned take the same kernel with one value per vector.
//
// Build: through tinyinfer/extensions/ (`make build`, or JIT at first use); no torch headers here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused.cuh"

namespace tinyinfer {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kCached = 4;


// N values of T moved as one load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---- block reduction ----------------------------------------------------------------------------------

__device__ inline float block_sum(float value) {
  __shared__ float warp_sums[kMaxThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < num_warps ? warp_sums[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) total = value;
  }
  __syncthreads();
  return total;
}

// ---- the two passes -------------------------------------------------------------------------------------

// Pass 1 for vector `v` of row t: r = x (+ residual, rounded, stored); returns r in `r`, adds r^2.
template <typename T, int N, bool kResidual>
__device__ inline void load_row_vector(const RMSNormParams& p, int64_t t, int64_t v, float (&r)[N],
                                       float& sumsq) {
  using P = Pack<T, N>;
  const P xv = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + t * p.x_stride)[v];
  if constexpr (kResidual) {
    const P rv = reinterpret_cast<const P*>(static_cast<const T*>(p.residual) + t * p.residual_stride)[v];
    P out;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out.v[i] = from_float<T>(add_rn(to_float(xv.v[i]), to_float(rv.v[i])));
      r[i] = to_float(out.v[i]);  // normalise the stored (rounded) sum, as the reference does
    }
    reinterpret_cast<P*>(static_cast<T*>(p.residual_out) + t * p.hidden)[v] = out;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r[i] = to_float(xv.v[i]);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) sumsq += r[i] * r[i];
}

// Pass 2: y = weight * dtype(r * inv_rms), each step rounded like the reference's tensor ops.
template <typename T, int N>
__device__ inline void store_normalised(const RMSNormParams& p, int64_t t, int64_t v, const float (&r)[N],
                                        float inv_rms) {
  using P = Pack<T, N>;
  const P w = reinterpret_cast<const P*>(p.weight)[v];
  P y;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float n = to_float(from_float<T>(mul_rn(r[i], inv_rms)));
    y.v[i] = from_float<T>(mul_rn(to_float(w.v[i]), n));
  }
  reinterpret_cast<P*>(static_cast<T*>(p.out) + t * p.hidden)[v] = y;
}

// r of vector v as pass 1 left it (for vectors past the register cache): re-read, never recomputed.
template <typename T, int N, bool kResidual>
__device__ inline void reload_row_vector(const RMSNormParams& p, int64_t t, int64_t v, float (&r)[N]) {
  using P = Pack<T, N>;
  const P rv = kResidual ? reinterpret_cast<const P*>(static_cast<const T*>(p.residual_out) + t * p.hidden)[v]
                         : reinterpret_cast<const P*>(static_cast<const T*>(p.x) + t * p.x_stride)[v];
#pragma unroll
  for (int i = 0; i < N; ++i) r[i] = to_float(rv.v[i]);
}

template <typename T, int N, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const RMSNormParams p) {
  const int64_t t = blockIdx.x;
  const int64_t num_vectors = p.hidden / N;
  float cached[kCached][N];
  float sumsq = 0.f;
  int64_t v = threadIdx.x;
#pragma unroll
  for (int c = 0; c < kCached; ++c, v += blockDim.x) {
    if (v < num_vectors) load_row_vector<T, N, kResidual>(p, t, v, cached[c], sumsq);
  }
  for (; v < num_vectors; v += blockDim.x) {
    float r[N];
    load_row_vector<T, N, kResidual>(p, t, v, r, sumsq);
  }
  // Same formula as the reference: rsqrt(sum / hidden + eps).
  const float inv_rms = rsqrtf(block_sum(sumsq) / static_cast<float>(p.hidden) + p.eps);
  v = threadIdx.x;
#pragma unroll
  for (int c = 0; c < kCached; ++c, v += blockDim.x) {
    if (v < num_vectors) store_normalised<T, N>(p, t, v, cached[c], inv_rms);
  }
  for (; v < num_vectors; v += blockDim.x) {
    float r[N];
    reload_row_vector<T, N, kResidual>(p, t, v, r);
    store_normalised<T, N>(p, t, v, r, inv_rms);
  }
}

template <typename T, int N>
cudaError_t launch_vectors(const RMSNormParams& p, cudaStream_t stream) {
  const int64_t num_vectors = p.hidden / N;
  // One vector per thread when the row allows it (decode rows are short: latency, not throughput),
  // in whole warps, at most kMaxThreads.
  const int64_t threads = num_vectors >= kMaxThreads ? kMaxThreads : ceil_div(num_vectors, 32) * 32;
  const dim3 grid(static_cast<unsigned int>(p.num_tokens));
  if (p.residual != nullptr) {
    rms_norm_kernel<T, N, true><<<grid, static_cast<unsigned int>(threads), 0, stream>>>(p);
  } else {
    rms_norm_kernel<T, N, false><<<grid, static_cast<unsigned int>(threads), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const RMSNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t quantities[] = {
      reinterpret_cast<int64_t>(p.x), reinterpret_cast<int64_t>(p.weight), reinterpret_cast<int64_t>(p.out),
      reinterpret_cast<int64_t>(p.residual), reinterpret_cast<int64_t>(p.residual_out),
      p.hidden * static_cast<int64_t>(sizeof(T)), p.x_stride * static_cast<int64_t>(sizeof(T)),
      p.residual_stride * static_cast<int64_t>(sizeof(T))};
  if (common_vector_bytes(quantities, sizeof(quantities) / sizeof(quantities[0])) == 16) {
    return launch_vectors<T, kVec>(p, stream);
  }
  return launch_vectors<T, 1>(p, stream);
}

}  // namespace

// Host launcher: T > 0 and < 2^31, hidden > 0; the residual fields are ignored when residual is
// nullptr (plain RMSNorm). Picks 16-byte vectors whenever every row start is 16-byte aligned.
cudaError_t launch_rms_norm(const RMSNormParams& p, FusedDtype dtype, cudaStream_t stream) {
  RMSNormParams q = p;
  if (q.residual == nullptr) {
    q.residual_out = nullptr;
    q.residual_stride = 0;
  }
  return launch_for_dtype(dtype, [&](auto t) { return launch_typed<decltype(t)>(q, stream); });
}

}  // namespace tinyinfer
