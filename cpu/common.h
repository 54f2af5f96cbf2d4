// common.h -- what the CPU kernels share: element loads/stores in float32 for every cache dtype, and the
// rounding torch applies after each elementwise op, so a kernel can repeat a reference's arithmetic
// bit for bit (float32 math, then round to the tensor dtype: round-to-nearest-even, as c10 does).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tinyinfer_cpu {

template <typename T>
inline float load(const T* p) { return static_cast<float>(*p); }

// The value of a float32 result once stored in a T tensor, back as float32 (exact for float).
template <typename T>
inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

template <typename T>
inline void store(T* p, float x) { *p = static_cast<T>(x); }

// A quantized KV cache (fp8 e4m3 or int8 values, float16 scales beside them: tinyinfer/ops/kv_quant.py).
inline bool is_quantized(const at::Tensor& cache) {
  return cache.scalar_type() == at::kFloat8_e4m3fn || cache.scalar_type() == at::kChar;
}

// An e4m3 byte times scale, without c10's bit-by-bit decode (3x a bf16 row's cost, measured): a normal
// value's exponent and mantissa bits move into a float's with the bias raised from 7 to 127, a subnormal
// one (exponent 0) is m x 2^-9; both computed and one picked by a bit mask, so the loop vectorizes (a
// branch stops it) and never touches a float denormal. The write never stores 0x7F / 0xFF (it clamps to
// +-448); here they would read as +-480, not NaN.
inline float fp8_e4m3_times(uint8_t b, float scale) {
  const uint32_t x = b, normal = ((x & 0x7f) << 20) + (120u << 23);
  const uint32_t sub = std::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(x & 7)) * 0x1p-9f);
  const uint32_t pick = 0u - static_cast<uint32_t>((x & 0x78) != 0);       // all ones: a normal value
  return std::bit_cast<float>(((x & 0x80) << 24) | (normal & pick) | (sub & ~pick)) * scale;
}

#if defined(__AVX512F__)
// fp8_e4m3_times on 16 bytes, the same bit moves on 16 lanes (the compiler leaves the scalar loop
// scalar). Nothing here is a float denormal: a float16 route (cvtph) would be, for e4m3's subnormals,
// and costs a microcode assist each (measured: 1% subnormal bytes made attention 1.3x slower).
inline __m512 fp8_e4m3_times16(const uint8_t* b, float scale) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  const __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7f)), 20),
                                          _mm512_set1_epi32(120 << 23));
  const __m512i sub = _mm512_castps_si512(
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(7))), _mm512_set1_ps(0x1p-9f)));
  const __mmask16 is_normal = _mm512_test_epi32_mask(x, _mm512_set1_epi32(0x78));
  const __m512i mag = _mm512_mask_blend_epi32(is_normal, sub, normal);
  const __m512i bits = _mm512_or_si512(mag, _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24));
  return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(scale));
}
#endif

// exp(x) for x <= 0 (softmax after its max is subtracted), written so the compiler can vectorize a loop
// of it (libm's expf is a call per element): x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6
// Taylor polynomial (relative error < 3e-7, ~2 float ulps), times 2^n built in the exponent bits.
// Below -87 the result is 0 (e^-87 < 2^-125: a weight that vanishes next to the row's max of 1).
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);                // (x < -87 ? -87 : x): NaN stays NaN
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;   // round to nearest (1.5 * 2^23)
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;   // ln2 = 0.693359375 - 2.12e-4
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return p * scale * static_cast<float>(!(x < -87.f));              // below -87: 0
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes, the same steps (the compiler does not vectorize the scalar one's loop).
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.f), x);        // NaN in x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~low), _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
}
#endif

// s[0..n) = exp_nonpositive(s - m); returns their sum.
inline float exp_shifted(float* s, int64_t n, float m) {
  int64_t p = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 total = _mm512_setzero_ps();
  for (; p + 16 <= n; p += 16) {
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + p), _mm512_set1_ps(m)));
    _mm512_storeu_ps(s + p, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; p < n; ++p) {
    s[p] = exp_nonpositive(s[p] - m);
    sum += s[p];
  }
  return sum;
}

// Calls body.template operator()<scalar_t>() for the three dtypes the engine runs.
#define TINYINFER_CPU_DISPATCH(dtype, name, ...)                                              \
  [&] {                                                                                        \
    switch (dtype) {                                                                           \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                      \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }           \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                   \
      default: TORCH_CHECK(false, name ": dtype ", dtype, " is not supported (float32, bfloat16, " \
                           "float16)");                                                      \
    }                                                                                          \
  }()

}  // namespace tinyinfer_cpu
