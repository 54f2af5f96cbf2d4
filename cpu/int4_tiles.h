// int4_tiles.h -- the inner loops of cpu/int4_linear.h (its header comment says what they compute): the
// INT4 kernel layout's indexing (tinyinfer/ops/int4_format.py), and on AVX-512 the product of one tile
// row (16 outputs) with one row of x -- int16 activations through VNNI (vpdpwssd), or float32 weights
// dequantized once per tile row for several rows (float32 FMAs: measured 1.2-1.4x faster here than
// bfloat16 weights through AVX512-BF16's vdpbf16ps, and exact).
#pragma once

#include <type_traits>

#include "common.h"

namespace tinyinfer_cpu {

constexpr int64_t kInt4TileK = 64, kInt4TileN = 16, kInt4TileBytes = 512;
// From this many rows of bfloat16 x on, the weights are dequantized per tile row, not x quantized.
constexpr int64_t kInt4DequantizeRows = 10;

// The k (0..63, within a tile) of byte o of a row pair's 64 bytes (int4_format.py: o = 16 t + 8 jh +
// 4 jl + 2 i2 + i1, k = 32 jh + 8 t + 4 jl + 2 i1 + i2).
constexpr int64_t int4_kofs(int64_t o) {
  return 32 * ((o >> 3) & 1) + 8 * (o >> 4) + 4 * ((o >> 2) & 1) + 2 * (o & 1) + ((o >> 1) & 1);
}

// A tile's scales / zeros are stored per group as 16 entries, entry 2 r + h for output row r + 8 h.
constexpr int64_t int4_entry(int64_t row) { return 2 * (row & 7) + (row >> 3); }

template <typename S>
inline float scale_at(const S* p) { return static_cast<float>(*p); }

// Where byte o of a row pair's 64 bytes finds its activation in a tile's 64 int16 (xp): the even
// bytes' in the first 32, the odd bytes' in the last 32 (a 16-bit lane of the weights, two bytes, then
// meets its two activations in two registers).
constexpr int64_t int4_xslot(int64_t o) { return (o & 1) * 32 + (o >> 1); }

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
  } else {                                                  // uint8 zero points
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

// The 4 nibbles of each 16-bit lane of a row pair's 64 bytes as int16: row g's (even byte, odd byte),
// row g + 8's (even, odd); each pair times the activations (XE, XO), summed per int32 lane.
struct Int4Pair {
  __m512i lo, hi;
};
inline Int4Pair int4_pair_dot(const uint8_t* chunk, __m512i XE, __m512i XO) {
  const __m512i v = _mm512_loadu_si512(chunk), low = _mm512_set1_epi16(0x0F);
  const __m512i z = _mm512_setzero_si512();
  return {dot16(dot16(z, _mm512_and_si512(v, low), XE), _mm512_and_si512(_mm512_srli_epi16(v, 8), low), XO),
          dot16(dot16(z, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), XE), _mm512_srli_epi16(v, 12), XO)};
}

// The int32 lane p of a pair sum covers bytes 4p..4p+3: its k lies in the tile's second 32 when p & 2.
// lane p of the scale vector of entry e: SA[e], or SB[e] (the second 32's group).
inline __m512 int4_lane_scales(__m512 SA, __m512 SB, int e) {
  const __m512i second = _mm512_setr_epi32(0, 0, 16, 16, 0, 0, 16, 16, 0, 0, 16, 16, 0, 0, 16, 16);
  return _mm512_permutex2var_ps(SA, _mm512_add_epi32(second, _mm512_set1_epi32(e)), SB);
}

// v[L] = the sum of f[r(L)]'s lanes; r(4j + c) = {0, 2, 1, 3}[c] + {0, 8, 4, 12}[j] (int4_reduce_row).
inline __m512 int4_reduce16(const __m512* f) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(f[i], f[i + 8], 0x44),
                         _mm512_shuffle_f32x4(f[i], f[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[i], t[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
constexpr int int4_reduce_row(int lane) {
  constexpr int within[4] = {0, 2, 1, 3}, block[4] = {0, 8, 4, 12};
  return within[lane & 3] + block[lane >> 2];
}

// One row of x against one tile row (16 outputs, all of K): out16[r] (float32, before the offsets).
template <typename S>
inline void int4_tile_row(const uint8_t* w, const S* sc, int64_t KB, int64_t G, const int16_t* xp,
                          const float* a, float* out16) {
  __m512 f[16];
  for (int r = 0; r < 16; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int64_t gA = kb * kInt4TileK / G, gB = (kb * kInt4TileK + 32) / G;
    const __m512 SA = _mm512_mul_ps(load16(sc + gA * 16), _mm512_set1_ps(a[gA]));
    const __m512 SB = _mm512_mul_ps(load16(sc + gB * 16), _mm512_set1_ps(a[gB]));
    const __m512i XE = _mm512_loadu_si512(xp + kb * kInt4TileK);
    const __m512i XO = _mm512_loadu_si512(xp + kb * kInt4TileK + 32);
    const uint8_t* t = w + kb * kInt4TileBytes;
    _mm_prefetch(reinterpret_cast<const char*>(t + 4 * kInt4TileBytes), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(t + 4 * kInt4TileBytes + 64 * g), _MM_HINT_T0);
      const Int4Pair d = int4_pair_dot(t + 64 * g, XE, XO);
      f[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d.lo), int4_lane_scales(SA, SB, 2 * g), f[g]);
      f[g + 8] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d.hi), int4_lane_scales(SA, SB, 2 * g + 1), f[g + 8]);
    }
  }
  alignas(64) float v[16];
  _mm512_store_ps(v, int4_reduce16(f));
  for (int lane = 0; lane < 16; ++lane) out16[int4_reduce_row(lane)] = v[lane];
}

// Several rows of x: each tile row's weights are dequantized once into wf (float32 w = q s + b: the
// reference's values, exactly) and multiplied into every row by float32 FMAs. wf holds, per tile and
// row pair g, 8 x 16 floats: row g's bytes 0-15, ..., 48-63, then row g + 8's.
template <typename S, typename Z>
inline void int4_tile_float(const uint8_t* w, const S* sc, const Z* zp, int64_t KB, int64_t G,
                            __m512* wf) {
  // lane l of a 16-byte step covers byte 16 i + l: k in the tile's second 32 when l >= 8.
  const __m512i second = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
  auto bias = [&](int64_t g) {
    if constexpr (std::is_same_v<Z, uint8_t>)
      return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(load16(zp + g * 16), load16(sc + g * 16)));
    else
      return load16(zp + g * 16);
  };
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int64_t gA = kb * kInt4TileK / G, gB = (kb * kInt4TileK + 32) / G;
    const __m512 SA = load16(sc + gA * 16), SB = load16(sc + gB * 16), BA = bias(gA), BB = bias(gB);
    const uint8_t* t = w + kb * kInt4TileBytes;
    for (int g = 0; g < 8; ++g) {
      const __m512i e0 = _mm512_add_epi32(second, _mm512_set1_epi32(2 * g));
      const __m512i e1 = _mm512_add_epi32(second, _mm512_set1_epi32(2 * g + 1));
      const __m512 s0 = _mm512_permutex2var_ps(SA, e0, SB), b0 = _mm512_permutex2var_ps(BA, e0, BB);
      const __m512 s1 = _mm512_permutex2var_ps(SA, e1, SB), b1 = _mm512_permutex2var_ps(BA, e1, BB);
      __m512* out = wf + (kb * 8 + g) * 8;
      for (int i = 0; i < 4; ++i) {       // q s + b, one rounding of an exact product: w itself
        const __m128i* bytes = reinterpret_cast<const __m128i*>(t + 64 * g + 16 * i);
        const __m512i by = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes));
        out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(by, _mm512_set1_epi32(15))), s0, b0);
        out[4 + i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(by, 4)), s1, b1);
      }
    }
  }
}

// R (1 or 2) rows of x (xf: Kp floats each, in each tile's byte order) against half h of a dequantized
// tile row (row pairs g = 4h .. 4h + 3): out[16 r + row]. A weight register feeds both rows of x (half
// the buffer's reads from cache per row), the 16 accumulators being 8 outputs x 2 rows.
template <int R>
inline void int4_float_rows(const __m512* wf, int64_t KB, const float* xf, int64_t Kp, int h, float* out) {
  __m512 f[16];
  for (int i = 0; i < 16; ++i) f[i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    __m512 X[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) X[r][i] = _mm512_loadu_ps(xf + r * Kp + kb * kInt4TileK + 16 * i);
    const __m512* t = wf + kb * 64 + h * 32;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < 4; ++i) {
        const __m512 lo = t[8 * j + i], hi = t[8 * j + 4 + i];
        for (int r = 0; r < R; ++r) {
          f[8 * r + j] = _mm512_fmadd_ps(lo, X[r][i], f[8 * r + j]);
          f[8 * r + 4 + j] = _mm512_fmadd_ps(hi, X[r][i], f[8 * r + 4 + j]);
        }
      }
    }
  }
  alignas(64) float v[16];
  _mm512_store_ps(v, int4_reduce16(f));
  for (int lane = 0; lane < 16; ++lane) {
    const int i = int4_reduce_row(lane), r = i >> 3, j = i & 7;
    if (r < R) out[16 * r + 4 * h + (j & 3) + 8 * (j >> 2)] = v[lane];
  }
}
#endif  // AVX-512 BW

}  // namespace tinyinfer_cpu
