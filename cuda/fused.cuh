// fused.cuh -- parameters and element math of the fused decode-path kernels (cuda/fused_norm.cu,
// cuda/rope_store_kv.cu). No CUDA runtime, no torch: g++ compiles it for tests/host/test_fused.cpp.
//
// Both kernels reproduce the reference ops of tinyinfer/ops/reference.py operation by operation: every
// product and sum the reference rounds to the model dtype is rounded here too (through a caller's
// `Round` functor), and products/sums are never contracted into FMAs. That keeps the elementwise part
// bit-identical to the reference; only the RMSNorm's sum of squares is summed in another order.
#pragma once

#include <cstdint>

#include "common.cuh"  // also defines __host__ / __device__ away for g++

#if defined(__CUDACC__) || defined(TINYINFER_EMULATE)
#include "ptx.cuh"  // element conversions (to_float / from_float)
#endif

namespace tinyinfer {

// A product / sum rounded on its own, as a separate tensor op rounds it: nvcc would otherwise fuse
// a * b + c into one FMA (one rounding), which the reference never does.
__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

enum class FusedDtype { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#if defined(__CUDACC__) && !defined(TINYINFER_EMULATE)
// Calls launch(T{}) with T the element type of `dtype`: the one place a fused kernel's dtype picks its
// template instance (the launchers of fused_norm.cu, rope_store_kv.cu and silu_mul.cu).
template <typename Launch>
inline cudaError_t launch_for_dtype(FusedDtype dtype, Launch&& launch) {
  switch (dtype) {
    case FusedDtype::kFloat32: return launch(float{});
    case FusedDtype::kFloat16: return launch(__half{});
    default: return launch(__nv_bfloat16{});
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// RMSNorm, optionally after a residual add
// ---------------------------------------------------------------------------------------------

// Rows of `hidden` values; all strides in elements, last dimension unit-stride.
struct RMSNormParams {
  const void* x;          // (T, hidden), row stride x_stride
  const void* residual;   // (T, hidden), row stride residual_stride; nullptr = plain RMSNorm
  const void* weight;     // (hidden,)
  void* out;              // (T, hidden) contiguous: y
  void* residual_out;     // (T, hidden) contiguous: x + residual (nullptr for plain RMSNorm)
  int64_t num_tokens;     // T
  int64_t hidden;
  int64_t x_stride;
  int64_t residual_stride;
  float eps;
};

// ---------------------------------------------------------------------------------------------
// RoPE (rotate_half layout) + K/V write into the paged cache
// ---------------------------------------------------------------------------------------------

// SwiGLU's activation (cuda/silu_mul.cu): y[t, i] = silu(x[t, i]) * x[t, width + i] for x = [gate | up].
struct SiluMulParams {
  const void* x;            // (T, 2 * width), rows x_row_stride elements apart, unit-stride columns
  void* y;                  // (T, width), contiguous
  int64_t num_tokens;       // T
  int64_t width;            // F: the MLP's intermediate size
  int64_t x_row_stride;
};

// All strides in elements; every last dimension unit-stride.
struct RopeStoreKVParams {
  const void* q;                 // (T, Hq, D)
  const void* k;                 // (T, Hkv, D)
  const void* v;                 // (T, Hkv, Dv)
  const void* cos_sin;           // (P, D) row stride cos_sin_stride: row p = [cos(p f_i) s, sin(p f_i) s], i < D/2
  const int64_t* positions;      // (T,) row of cos_sin per token; outside [0, P) -> NaN outputs
  void* q_out;                   // (T, Hq, D) contiguous: rotated q
  void* k_out;                   // (T, Hkv, D) contiguous: rotated k (what the cache receives)
  void* k_cache;                 // (NB, BS, Hkv, D)
  void* v_cache;                 // (NB, BS, Hkv, Dv)
  const int64_t* slot_mapping;   // (T,) -1 = padding: rotated, but not stored
  int64_t num_tokens, num_q_heads, num_kv_heads, head_dim, head_dim_v;
  int64_t num_blocks, block_size;
  int64_t num_positions;         // P
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int64_t cos_sin_stride;
  CacheStrides k_cache_strides;
  CacheStrides v_cache_strides;
};

// rotate_half pairs dim i of the first half with dim i + D/2: with x1 = x[:D/2], x2 = x[D/2:],
//     out[:D/2] = x1 * cos[:D/2] + (-x2) * sin[:D/2]
//     out[D/2:] = x2 * cos[D/2:] +   x1  * sin[D/2:]
// (rope_store_kv reads one (cos, sin) pair per i from its table: cos1 = cos2, sin1 = sin2.)
// A thread owns pair index j (0 <= j < D/2) and writes out[j] and out[j + D/2] from the same two
// loads. `Round` maps a float to the nearest value of the model dtype (identity for fp32); each
// product and the sum are rounded as the reference's separate tensor ops round them.
template <typename Round>
__host__ __device__ inline void rope_pair(float x1, float x2, float cos1, float sin1, float cos2,
                                          float sin2, Round round, float* out1, float* out2) {
  *out1 = round(add_rn(round(mul_rn(x1, cos1)), round(mul_rn(-x2, sin1))));
  *out2 = round(add_rn(round(mul_rn(x2, cos2)), round(mul_rn(x1, sin2))));
}

// Work split of one token in rope_store_kv: units [0, rope_units) rotate one vector of `vec`
// pairs of one head (q heads first, then k heads); units [rope_units, total) copy one vector of
// `vec` values of one V head.
struct RopeUnit {
  bool is_rope;
  int64_t head;     // rope: 0..Hq+Hkv-1 (>= Hq means k head head-Hq); copy: 0..Hkv-1
  int64_t column;   // rope: first pair index j of the vector; copy: first V column
};

__host__ __device__ inline int64_t rope_units(int64_t num_q_heads, int64_t num_kv_heads,
                                              int64_t head_dim, int64_t vec) {
  return (num_q_heads + num_kv_heads) * (head_dim / 2 / vec);
}

__host__ __device__ inline int64_t rope_store_units(int64_t num_q_heads, int64_t num_kv_heads,
                                                    int64_t head_dim, int64_t head_dim_v, int64_t vec) {
  return rope_units(num_q_heads, num_kv_heads, head_dim, vec) + num_kv_heads * (head_dim_v / vec);
}

__host__ __device__ inline RopeUnit rope_unit(int64_t u, int64_t num_q_heads, int64_t num_kv_heads,
                                              int64_t head_dim, int64_t head_dim_v, int64_t vec) {
  const int64_t pairs = head_dim / 2 / vec, nrope = rope_units(num_q_heads, num_kv_heads, head_dim, vec);
  if (u < nrope) return RopeUnit{true, u / pairs, (u % pairs) * vec};
  const int64_t c = u - nrope, cols = head_dim_v / vec;
  return RopeUnit{false, c / cols, (c % cols) * vec};
}


}  // namespace tinyinfer
