// q8_linear.h -- y = x W^T with W in GGUF's Q8_0 (llama.cpp's block format: each run of 32 weights of a
// row is 32 int8 levels q and one float16 scale d, w = d q): the lm_head of a model whose tied embedding
// the file stores Q8_0, one copy for the embedding and the head (docs/cpu-performance.md). Integer dot
// products as llama.cpp's Q8_0 x Q8_0 computes them, with the activations kept to 15 bits: each run of 32
// activations of a row becomes two int8 levels on its own grid (q8_quantize_row: a single int8 level, as
// llama.cpp, doubled the teacher-forced KL of SmolLM2's default path, docs/cpu-performance.md); a
// block's sums of q q1 and q q2 are exact in int32; y = sum over blocks of d dx (256 q.q1 + q.q2).
//
// Layout (tinyinfer/layers/q8.py: pack_q8): columns in groups of 16, interleaved by 4 levels,
// packed (N/16, K/4, 16, 4) uint8 holding q + 128, scales (N/16, K/32, 16) float16. With AVX-512 VNNI one
// vpdpbusd multiplies 4 activation levels (broadcast) into 4 levels of each of 16 columns: 8 of them do a
// block of 16 columns, whose results land in 16 lanes (no horizontal sums), and the weight vectors stay
// in registers across the rows of x -- the weight is read once for all rows. vpdpbusd takes unsigned x
// signed bytes, so the weights are stored + 128 and each block's dot starts from -128 (its activation
// levels' sum). Columns are split across threads. Error: the activations' rounding (<= max|x| / (127 *
// 256) per run of 32) and float32 rounding of the per-block sums (tests/test_q8_head.py's bound).
#pragma once

#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"

namespace tinyinfer_cpu {

constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ8Cols = 16;  // columns per packed group

// One row of K activations (K % 32 == 0) -> per block of 32, on the grid of d = max|x| / 127: two int8
// levels per activation, x ~ d (q1 + q2 / 256) (q1 = round(x / d), q2 = round(256 (x / d - q1)), within
// d / 256 -- 15 bits, finer than bfloat16's 8), into qx (2K: the q1 then the q2 of the row); the scales
// d / 256 (K/32) and the blocks' offsets -128 (256 sum(q1) + sum(q2)) (K/32).
inline void q8_quantize_row(const float* x, int64_t K, int8_t* qx, float* dx, int32_t* off) {
  for (int64_t g = 0; g < K / kQ8Block; ++g) {
    const float* xb = x + g * kQ8Block;
    float amax = 0.f;
    for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int32_t sum1 = 0, sum2 = 0;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const float t = xb[i] * id;
      const float q1 = std::nearbyint(t);                         // |q1| <= 127; t - q1 is exact
      const int32_t q2 = std::min(127, static_cast<int32_t>(std::nearbyint((t - q1) * 256.f)));
      qx[g * kQ8Block + i] = static_cast<int8_t>(q1);
      qx[K + g * kQ8Block + i] = static_cast<int8_t>(q2);
      sum1 += static_cast<int32_t>(q1);
      sum2 += q2;
    }
    dx[g] = d / 256.f;
    off[g] = -128 * (256 * sum1 + sum2);
  }
}

// Rows [0, R) against one group of 16 columns: y[r * ldy + j] for j < cols.
template <int R>
inline void q8_group(const uint8_t* w, const c10::Half* s, const int8_t* qx, const float* dx,
                     const int32_t* off, int64_t K, float* y, int64_t ldy, int64_t cols) {
  const int64_t G = K / kQ8Block;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[8];
    for (int i = 0; i < 8; ++i) wv[i] = _mm512_loadu_si512(w + (g * 8 + i) * 64);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * kQ8Cols)));
    for (int r = 0; r < R; ++r) {
      const int32_t* x1 = reinterpret_cast<const int32_t*>(qx + 2 * r * K + g * kQ8Block);
      const int32_t* x2 = reinterpret_cast<const int32_t*>(qx + (2 * r + 1) * K + g * kQ8Block);
      __m512i dot1 = _mm512_setzero_si512(), dot2 = _mm512_set1_epi32(off[r * G + g]);
      for (int i = 0; i < 8; ++i) {
        dot1 = _mm512_dpbusd_epi32(dot1, wv[i], _mm512_set1_epi32(x1[i]));
        dot2 = _mm512_dpbusd_epi32(dot2, wv[i], _mm512_set1_epi32(x2[i]));
      }
      const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(dot1, 8), dot2);  // |dot| < 2^28
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(dx[r * G + g])),
                               acc[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, mask, acc[r]);
#else
  for (int r = 0; r < R; ++r) {
    float acc[kQ8Cols] = {};
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < kQ8Cols; ++j) {
        int32_t dot = off[r * G + g];
        for (int64_t k = 0; k < kQ8Block; ++k)
          dot += static_cast<int32_t>(w[(g * 8 + k / 4) * 64 + j * 4 + k % 4]) *
                 (256 * qx[2 * r * K + g * kQ8Block + k] + qx[(2 * r + 1) * K + g * kQ8Block + k]);
        acc[j] += static_cast<float>(dot) * (static_cast<float>(s[g * kQ8Cols + j]) * dx[r * G + g]);
      }
    }
    for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = acc[j];
  }
#endif
}

// x (M, K) float32 / bfloat16 / float16; packed (Np/16, K/4, 16, 4) uint8 (q + 128); scales
// (Np/16, K/32, 16) float16; n <= Np the table's rows -> (M, n) float32.
inline at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && scales.dim() == 3 && x.size(1) % kQ8Block == 0 &&
                  packed.size(1) * 4 == x.size(1) && packed.size(2) == kQ8Cols && packed.size(3) == 4 &&
                  scales.size(0) == packed.size(0) && scales.size(1) == x.size(1) / kQ8Block &&
                  scales.size(2) == kQ8Cols && n > packed.size(0) * kQ8Cols - kQ8Cols &&
                  n <= packed.size(0) * kQ8Cols,
              "q8_linear: x ", x.sizes(), ", packed levels ", packed.sizes(), ", scales ", scales.sizes(),
              " and n ", n, " do not fit (M, K), (ceil(n/16), K/4, 16, 4), (ceil(n/16), K/32, 16) with K "
              "a multiple of 32 (layers/q8.py: pack_q8)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf,
              "q8_linear: the packed levels must be uint8 and the scales float16, got ", packed.scalar_type(),
              " and ", scales.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous(), w = packed.contiguous(), s = scales.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / kQ8Block, groups = packed.size(0);
  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  std::vector<int8_t> qx(2 * M * K);
  std::vector<float> dx(M * G);
  std::vector<int32_t> off(M * G);
  for (int64_t m = 0; m < M; ++m)
    q8_quantize_row(xf.const_data_ptr<float>() + m * K, K, qx.data() + 2 * m * K, dx.data() + m * G,
                    off.data() + m * G);
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const c10::Half* sp = s.const_data_ptr<c10::Half>();
  float* yp = y.mutable_data_ptr<float>();
  // Group by group, every row against it before the next group: the weight is read once.
  at::parallel_for(0, groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t c = g0; c < g1; ++c) {
      const uint8_t* wc = wp + c * K * kQ8Cols;
      const c10::Half* sc = sp + c * G * kQ8Cols;
      const int64_t cols = std::min<int64_t>(kQ8Cols, n - c * kQ8Cols);
      for (int64_t m = 0; m < M; m += 8) {
        const int8_t* q = qx.data() + 2 * m * K;
        const float* d = dx.data() + m * G;
        const int32_t* o = off.data() + m * G;
        float* yr = yp + m * n + c * kQ8Cols;
        switch (std::min<int64_t>(8, M - m)) {
          case 1: q8_group<1>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 2: q8_group<2>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 3: q8_group<3>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 4: q8_group<4>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 5: q8_group<5>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 6: q8_group<6>(wc, sc, q, d, o, K, yr, n, cols); break;
          case 7: q8_group<7>(wc, sc, q, d, o, K, yr, n, cols); break;
          default: q8_group<8>(wc, sc, q, d, o, K, yr, n, cols); break;
        }
      }
    }
  });
  return y;
}

}  // namespace tinyinfer_cpu
