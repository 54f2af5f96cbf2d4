// int4_linear.h -- y = x W^T for a group-quantized 4-bit W in the INT4 layer's own kernel layout
// (tinyinfer/ops/int4_format.py: tiles of 16 output rows x 64 k, 512 bytes each; W = (q - z) s, or
// q s + m for GGUF Q4_1's float offset), with integer dot products: the activations are quantized per
// weight group to int16 (a = max|x| / 32767, x ~ a xq), and each output is
//   y[n] = sum_g s[n,g] a[g] sum_{k in g} q[n,k] xq[k]  +  b[n,g] a[g] sum_{k in g} xq[k],
// b = m, or -z s: the exact dot product of the dequantized weights with the quantized activations,
// the integer part through AVX-512 VNNI (vpdpwssd: int16 pairs into int32; as llama.cpp's Q8 dot
// products use vpdpbusd on int8, ggml-quants.c, but with 15 bits of each group's activations kept).
// The layout's byte order is matched by permuting the activations once per call, not the weights:
// 64 bytes at offset 64 g of a tile hold rows g (low nibbles) and g + 8 (high) for all 64 k, byte o
// for k = kofs(o). So the layer's tensors are the only INT4 form on the CPU (no repacked copy). The
// tiles of 16 outputs are split across threads (at::parallel_for); each tile's weights (K x 8 bytes)
// are read from memory once and from L1 for every further row of x. Without AVX-512 BW a scalar loop
// computes the same sums. Error: |y - x W^T| <= sum_g a[g] / 2 sum_{k in g} |w_k| plus float32
// rounding (tests/test_int4_vnni.py holds it to float64).
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace tinyinfer_cpu {

constexpr int64_t kInt4TileK = 64, kInt4TileN = 16, kInt4TileBytes = 512;

// The k (0..63, within a tile) of byte o of a row pair's 64 bytes (int4_format.py: o = 16 t + 8 jh +
// 4 jl + 2 i2 + i1, k = 32 jh + 8 t + 4 jl + 2 i1 + i2).
constexpr int64_t int4_kofs(int64_t o) {
  return 32 * ((o >> 3) & 1) + 8 * (o >> 4) + 4 * ((o >> 2) & 1) + 2 * (o & 1) + ((o >> 1) & 1);
}

// A tile's scales / zeros are stored per group as 16 entries, entry 2 r + h for output row r + 8 h.
constexpr int64_t int4_entry(int64_t row) { return 2 * (row & 7) + (row >> 3); }

template <typename S>
inline float scale_at(const S* p) { return static_cast<float>(*p); }

// Row m of x quantized: xp (Kp) int16 in the tiles' byte order, a[g] its group's scale and xs[g] =
// a[g] sum_{k in g} xq[k]. A group with a NaN or infinity gets a = NaN (so do its outputs).
template <typename T>
inline void int4_quantize_row(const T* x, int64_t K, int64_t G, int64_t ng, int16_t* xp, float* a,
                              float* xs) {
  int16_t perm[kInt4TileK];
  for (int64_t o = 0; o < kInt4TileK; ++o) perm[int4_kofs(o)] = static_cast<int16_t>(o);
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t k0 = g * G, k1 = std::min(K, k0 + G);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      const float v = load(x + k);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::abs(v));
    }
    const float inv = (finite && amax > 0.f) ? 32767.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k0 + G; ++k) {
      const float v = k < k1 ? load(x + k) * inv : 0.f;
      const int32_t q = static_cast<int32_t>(std::nearbyint(std::clamp(v, -32767.f, 32767.f)));
      sum += q;
      xp[(k / kInt4TileK) * kInt4TileK + perm[k % kInt4TileK]] = static_cast<int16_t>(q);
    }
    a[g] = finite ? amax / 32767.f : std::nanf("");
    xs[g] = a[g] * static_cast<float>(sum);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <typename S>
inline __m512 load16(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<S, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {  // uint8 zero points
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
}

// acc + the pairwise int16 products of a and b, summed per int32 lane (vpdpwssd; vpmaddwd + add, the
// same integers, on AVX-512 without VNNI).
inline __m512i dot16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// One tile row (16 outputs, all of K) against one quantized row of x: f[r] (16 lanes each) summed.
template <typename S>
inline void int4_tile_row(const uint8_t* w, const S* sc, int64_t KB, int64_t G, const int16_t* xp,
                          const float* a, float* out16) {
  __m512 f[16];
  for (int r = 0; r < 16; ++r) f[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi16(0x0F);
  // Lane p of a pair sum covers bytes 32 h + 2 p, + 1: its k lies in the tile's second 32 when p & 4.
  alignas(64) static const int32_t lanes[16] = {0, 0, 0, 0, 16, 16, 16, 16, 0, 0, 0, 0, 16, 16, 16, 16};
  const __m512i second = _mm512_load_si512(lanes);
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int64_t gA = kb * kInt4TileK / G, gB = (kb * kInt4TileK + 32) / G;
    const __m512 SA = _mm512_mul_ps(load16(sc + gA * 16), _mm512_set1_ps(a[gA]));
    const __m512 SB = _mm512_mul_ps(load16(sc + gB * 16), _mm512_set1_ps(a[gB]));
    const __m512i X0 = _mm512_loadu_si512(xp + kb * kInt4TileK);
    const __m512i X1 = _mm512_loadu_si512(xp + kb * kInt4TileK + 32);
    const uint8_t* t = w + kb * kInt4TileBytes;
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 64 * g)));
      const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 64 * g + 32)));
      const __m512i lo = dot16(dot16(_mm512_setzero_si512(), _mm512_and_si512(w0, low), X0),
                               _mm512_and_si512(w1, low), X1);
      const __m512i hi = dot16(dot16(_mm512_setzero_si512(), _mm512_srli_epi16(w0, 4), X0),
                               _mm512_srli_epi16(w1, 4), X1);
      const __m512 sg = _mm512_permutex2var_ps(SA, _mm512_add_epi32(second, _mm512_set1_epi32(2 * g)), SB);
      const __m512 sg8 = _mm512_permutex2var_ps(SA, _mm512_add_epi32(second, _mm512_set1_epi32(2 * g + 1)), SB);
      f[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), sg, f[g]);
      f[g + 8] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), sg8, f[g + 8]);
    }
  }
  for (int r = 0; r < 16; ++r) out16[r] = _mm512_reduce_add_ps(f[r]);
}
#else
// The same sums, one byte at a time.
template <typename S>
inline void int4_tile_row(const uint8_t* w, const S* sc, int64_t KB, int64_t G, const int16_t* xp,
                          const float* a, float* out16) {
  for (int r = 0; r < 16; ++r) out16[r] = 0.f;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int64_t gs[2] = {kb * kInt4TileK / G, (kb * kInt4TileK + 32) / G};
    const uint8_t* t = w + kb * kInt4TileBytes;
    const int16_t* xt = xp + kb * kInt4TileK;
    for (int g = 0; g < 8; ++g) {
      int32_t lo[2] = {0, 0}, hi[2] = {0, 0};
      for (int o = 0; o < 64; ++o) {
        const int32_t b = t[64 * g + o], half = (o >> 3) & 1;
        lo[half] += (b & 15) * xt[o];
        hi[half] += (b >> 4) * xt[o];
      }
      for (int h = 0; h < 2; ++h) {
        out16[g] += static_cast<float>(lo[h]) * (scale_at(sc + gs[h] * 16 + 2 * g) * a[gs[h]]);
        out16[g + 8] += static_cast<float>(hi[h]) * (scale_at(sc + gs[h] * 16 + 2 * g + 1) * a[gs[h]]);
      }
    }
  }
}
#endif

// off[e] (tile entry order) = sum_g b[e, g] xs[g]: b = zeros (float offsets) or -z s (zero points).
template <typename S, typename Z>
inline void int4_tile_offsets(const S* sc, const Z* zp, int64_t ng, const float* xs, float* off) {
  for (int e = 0; e < 16; ++e) off[e] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    for (int e = 0; e < 16; ++e) {
      const float b = std::is_same_v<Z, uint8_t> ? -static_cast<float>(zp[g * 16 + e]) * scale_at(sc + g * 16 + e)
                                                  : scale_at(zp + g * 16 + e);
      off[e] += b * xs[g];
    }
  }
}

// x (M, K) float32 / bfloat16 / float16; qweight (N/16, Kp/64, 32, 4) int32; scales (N/16, Kp/G, 16)
// float16 / bfloat16 / float32; zeros alike, uint8 or the scales' dtype -> (M, N) in x's dtype.
inline at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 4 && scales.dim() == 3 && zeros.sizes() == scales.sizes() &&
                  qweight.size(2) == 32 && qweight.size(3) == 4 && scales.size(0) == qweight.size(0) &&
                  scales.size(2) == 16 && group_size > 0 && group_size % 32 == 0 &&
                  scales.size(1) * group_size == qweight.size(1) * kInt4TileK &&
                  x.size(1) <= qweight.size(1) * kInt4TileK && x.size(1) > (qweight.size(1) - 1) * kInt4TileK,
              "int4_linear: x ", x.sizes(), ", qweight ", qweight.sizes(), ", scales ", scales.sizes(),
              ", zeros ", zeros.sizes(), " and group size ", group_size, " do not fit the INT4 kernel ",
              "layout (M, K), (N/16, Kp/64, 32, 4), (N/16, Kp/G, 16) x 2 (tinyinfer/ops/int4_format.py)");
  TORCH_CHECK(qweight.scalar_type() == at::kInt &&
                  (zeros.scalar_type() == at::kByte || zeros.scalar_type() == scales.scalar_type()),
              "int4_linear: qweight must be int32 and zeros uint8 or the scales' dtype, got ",
              qweight.scalar_type(), ", ", zeros.scalar_type(), " with scales ", scales.scalar_type());
  const at::Tensor xc = x.contiguous(), w = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NT = w.size(0), KB = w.size(1), ng = s.size(1);
  const int64_t N = NT * kInt4TileN, Kp = KB * kInt4TileK;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int16_t> xp(M * Kp);
  std::vector<float> a(M * ng), xs(M * ng);
  TINYINFER_CPU_DISPATCH(x.scalar_type(), "int4_linear", [&] {
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        int4_quantize_row(xd + m * K, K, group_size, ng, xp.data() + m * Kp, a.data() + m * ng,
                          xs.data() + m * ng);
    });
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    const uint8_t* wd = reinterpret_cast<const uint8_t*>(w.const_data_ptr<int32_t>());
    auto run = [&](auto* sc, auto* zp) {
      at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
        float out[16], off[16];
        for (int64_t nt = t0; nt < t1; ++nt) {
          const auto* st = sc + nt * ng * 16;
          const auto* zt = zp + nt * ng * 16;
          for (int64_t m = 0; m < M; ++m) {
            int4_tile_row(wd + nt * KB * kInt4TileBytes, st, KB, group_size, xp.data() + m * Kp,
                          a.data() + m * ng, out);
            int4_tile_offsets(st, zt, ng, xs.data() + m * ng, off);
            for (int64_t r = 0; r < 16; ++r)
              yd[m * N + nt * 16 + r] = static_cast<scalar_t>(out[r] + off[int4_entry(r)]);
          }
        }
      });
    };
    auto with_scales = [&](auto* sc) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(sc)>>;
      if (z.scalar_type() == at::kByte) run(sc, z.const_data_ptr<uint8_t>());
      else run(sc, reinterpret_cast<const S*>(z.const_data_ptr()));
    };
    switch (s.scalar_type()) {
      case at::kHalf: with_scales(s.const_data_ptr<c10::Half>()); break;
      case at::kBFloat16: with_scales(s.const_data_ptr<c10::BFloat16>()); break;
      case at::kFloat: with_scales(s.const_data_ptr<float>()); break;
      default: TORCH_CHECK(false, "int4_linear: scales of dtype ", s.scalar_type(), " are not supported "
                           "(float16, bfloat16, float32)");
    }
  });
  return y;
}

}  // namespace tinyinfer_cpu
