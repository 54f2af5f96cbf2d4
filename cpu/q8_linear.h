// q8_linear.h -- y = x W^T with W stored in GGUF's Q8_0 (llama.cpp's block format: each run of 32 weights
// of a row is 32 int8 levels q and one float16 scale d, w = d q): the lm_head of a model whose tied
// embedding the file stores Q8_0, read from those bytes, one copy for the embedding and the head
// (docs/cpu-performance.md). The weight is read once for all rows of x: per output column, each block's
// levels are widened to float32 and scaled once (d q is exact in float32: 8 x 11 significant bits), then
// multiplied into up to 8 rows of x at a time, whose accumulators stay in registers; a later group of
// rows finds the column's 576 bytes in L1. Float32 products and sums, so the result is within float32
// rounding of the float64 product with the dequantized weight (tests/test_q8_head.py).
#pragma once

#include <ATen/Parallel.h>

#include "common.h"

namespace tinyinfer_cpu {

constexpr int64_t kQ8Block = 32;

// Rows [0, R) of xf (R rows of K, row stride K) against column n: y[r * N] = sum_k xf[r][k] w[n][k].
template <int R>
inline void q8_column(const float* xf, int64_t K, const int8_t* q, const c10::Half* d, float* y,
                      int64_t N) {
#if defined(__AVX512F__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kQ8Block; ++g) {
    const __m512 s = _mm512_set1_ps(static_cast<float>(d[g]));
    const int8_t* qg = q + g * kQ8Block;
    const __m512 w0 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg)))), s);
    const __m512 w1 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + 16)))),
        s);
    for (int r = 0; r < R; ++r) {
      const float* xr = xf + r * K + g * kQ8Block;
      acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r]);
      acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = _mm512_reduce_add_ps(acc[r]);
#else
  float acc[R] = {};
  for (int64_t g = 0; g < K / kQ8Block; ++g) {
    const float s = static_cast<float>(d[g]);
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const float w = static_cast<float>(q[g * kQ8Block + i]) * s;
      for (int r = 0; r < R; ++r) acc[r] += w * xf[r * K + g * kQ8Block + i];
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = acc[r];
#endif
}

// x (M, K) float32 / bfloat16 / float16; qs (N, K) int8; d (N, K/32) float16 -> (M, N) float32.
inline at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && d.dim() == 2 && x.size(1) == qs.size(1) &&
                  qs.size(1) % kQ8Block == 0 && d.size(0) == qs.size(0) && d.size(1) == qs.size(1) / kQ8Block,
              "q8_linear: x ", x.sizes(), ", levels ", qs.sizes(), " and scales ", d.sizes(),
              " do not fit (M, K), (N, K), (N, K/32)");
  TORCH_CHECK(qs.scalar_type() == at::kChar && d.scalar_type() == at::kHalf,
              "q8_linear: the levels must be int8 and the scales float16, got ", qs.scalar_type(), " and ",
              d.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous(), q = qs.contiguous(), s = d.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.const_data_ptr<float>();
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const c10::Half* sp = s.const_data_ptr<c10::Half>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t G = K / kQ8Block;
  // Column by column, every row group against it before the next column: the weight is read once.
  at::parallel_for(0, N, 512, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = qp + n * K;
      const c10::Half* sn = sp + n * G;
      for (int64_t m = 0; m < M; m += 8) {
        const float* xr = xp + m * K;
        float* yr = yp + m * N + n;
        switch (std::min<int64_t>(8, M - m)) {
          case 1: q8_column<1>(xr, K, qn, sn, yr, N); break;
          case 2: q8_column<2>(xr, K, qn, sn, yr, N); break;
          case 3: q8_column<3>(xr, K, qn, sn, yr, N); break;
          case 4: q8_column<4>(xr, K, qn, sn, yr, N); break;
          case 5: q8_column<5>(xr, K, qn, sn, yr, N); break;
          case 6: q8_column<6>(xr, K, qn, sn, yr, N); break;
          case 7: q8_column<7>(xr, K, qn, sn, yr, N); break;
          default: q8_column<8>(xr, K, qn, sn, yr, N); break;
        }
      }
    }
  });
  return y;
}

}  // namespace tinyinfer_cpu
