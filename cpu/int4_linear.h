// int4_linear.h -- y = x W^T for a group-quantized 4-bit W in the INT4 layer's own kernel layout
// (tinyinfer/ops/int4_format.py: tiles of 16 output rows x 64 k, 512 bytes each; W = (q - z) s, or
// q s + m for GGUF Q4_1's float offset). The layout's byte order is matched by permuting x once per
// call, not the weights, so the layer's tensors are the only INT4 form on the CPU (no repacked copy).
// One row (decode at batch 1, memory-bound): integer dot products -- x quantized per weight group to
// int16 (a = max|x_g| / 32767, x ~ a xq) and
//   y[n] = sum_g s[n,g] a[g] sum_{k in g} q[n,k] xq[k]  +  b[n,g] a[g] sum_{k in g} xq[k]   (b = m or -z s),
// the exact product of the dequantized weights with the quantized activations, its integer part
// through AVX-512 VNNI (vpdpwssd, int16 pairs into int32; llama.cpp's Q8 dot products use vpdpbusd on
// int8, ggml-quants.c: int16 keeps 15 bits of each group); error <= sum_k a[g(k)] / 2 |w_k| plus
// float32 rounding. From kInt4DequantizeRows rows on (verify, batches, prefill): each tile row's
// weights dequantized once per call into float32 -- the reference's values exactly -- and multiplied
// into every row by float32 FMAs (cpu/int4_tiles.h; measured faster than int16 dot products from 2
// rows on, docs/cpu-performance.md), error float32 rounding only. A row's result does not depend on
// the rows beside it within a path, nor on the thread count: the tiles of 16 outputs are split across
// threads (at::parallel_for), each tile's weights read from memory once per call. Without AVX-512 BW
// a scalar loop computes the integer path's sums for every row. tests/test_int4_vnni.py holds both
// to float64.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "int4_tiles.h"

namespace tinyinfer_cpu {
// Row m of x quantized: xp (Kp) int16 in the tiles' order (int4_xslot), a[g] its group's scale and
// xs[g] = a[g] sum_{k in g} xq[k]. A group with a NaN or infinity gets a = NaN (so do its outputs).
template <typename T>
inline void int4_quantize_row(const T* x, int64_t K, int64_t G, int64_t ng, int16_t* xp, float* a,
                              float* xs) {
  int16_t slot[kInt4TileK];                                 // k within a tile -> its place in xp
  for (int64_t o = 0; o < kInt4TileK; ++o) slot[int4_kofs(o)] = static_cast<int16_t>(int4_xslot(o));
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
      xp[(k / kInt4TileK) * kInt4TileK + slot[k % kInt4TileK]] = static_cast<int16_t>(q);
    }
    a[g] = finite ? amax / 32767.f : std::nanf("");
    xs[g] = a[g] * static_cast<float>(sum);
  }
}

#if !(defined(__AVX512F__) && defined(__AVX512BW__))
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
        const int32_t b = t[64 * g + o], half = (o >> 3) & 1, xq = xt[int4_xslot(o)];
        lo[half] += (b & 15) * xq;
        hi[half] += (b >> 4) * xq;
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
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 b = std::is_same_v<Z, uint8_t>
                         ? _mm512_mul_ps(load16(zp + g * 16), load16(sc + g * 16)) : load16(zp + g * 16);
    acc = _mm512_fmadd_ps(b, _mm512_set1_ps(std::is_same_v<Z, uint8_t> ? -xs[g] : xs[g]), acc);
  }
  _mm512_storeu_ps(off, acc);
#else
  for (int e = 0; e < 16; ++e) off[e] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    for (int e = 0; e < 16; ++e) {
      const float s = scale_at(sc + g * 16 + e);
      const float b = std::is_same_v<Z, uint8_t> ? static_cast<float>(zp[g * 16 + e]) * s
                                                  : scale_at(zp + g * 16 + e);
      off[e] += b * (std::is_same_v<Z, uint8_t> ? -xs[g] : xs[g]);
    }
  }
#endif
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
  const at::Tensor xc = x.contiguous(), w = qweight.contiguous();
  const at::Tensor s = scales.contiguous(), z = zeros.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NT = w.size(0), KB = w.size(1), ng = s.size(1);
  const int64_t N = NT * kInt4TileN, Kp = KB * kInt4TileK;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // Several rows: weights dequantized once per tile row (int4_tile_float); one: x quantized to int16.
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const bool dequantize = M >= kInt4DequantizeRows;
#else
  const bool dequantize = false;
#endif
  std::vector<int16_t> xp(dequantize ? 0 : M * Kp);
  std::vector<float> xf(dequantize ? M * Kp : 0);
  std::vector<float> a(M * ng), xs(M * ng);
  TINYINFER_CPU_DISPATCH(x.scalar_type(), "int4_linear", [&] {
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        if (!dequantize) {
          int4_quantize_row(xd + m * K, K, group_size, ng, xp.data() + m * Kp, a.data() + m * ng,
                            xs.data() + m * ng);
          continue;
        }
        for (int64_t k = 0; k < Kp; ++k) {                  // x in each tile's byte order
          const int64_t src = (k / kInt4TileK) * kInt4TileK + int4_kofs(k % kInt4TileK);
          xf[m * Kp + k] = src < K ? load(xd + m * K + src) : 0.f;
        }
      }
    });
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    const uint8_t* wd = reinterpret_cast<const uint8_t*>(w.const_data_ptr<int32_t>());
    auto run = [&](auto* sc, auto* zp) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(sc)>>;
      at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> off(dequantize ? 0 : M * 16);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        std::vector<__m512> wf(dequantize ? KB * 64 : 0);
#endif
        float out[16];
        for (int64_t nt = t0; nt < t1; ++nt) {
          const S* st = sc + nt * ng * 16;
          const uint8_t* wt = wd + nt * KB * kInt4TileBytes;
          scalar_t* yt = yd + nt * 16;
#if defined(__AVX512F__) && defined(__AVX512BW__)
          if (dequantize) {
            int4_tile_float(wt, st, zp + nt * ng * 16, KB, group_size, wf.data());
            float out2[32];
            for (int64_t m = 0; m < M; m += 2) {
              const int64_t R = std::min<int64_t>(2, M - m);
              for (int h = 0; h < 2; ++h) {
                if (R == 2) int4_float_rows<2>(wf.data(), KB, xf.data() + m * Kp, Kp, h, out2);
                else int4_float_rows<1>(wf.data(), KB, xf.data() + m * Kp, Kp, h, out2);
              }
              for (int64_t r = 0; r < R * 16; ++r)
                yt[(m + r / 16) * N + r % 16] = static_cast<scalar_t>(out2[r]);
            }
            continue;
          }
#endif
          for (int64_t m = 0; m < M; ++m) {
            int4_tile_offsets(st, zp + nt * ng * 16, ng, xs.data() + m * ng, off.data() + m * 16);
            int4_tile_row(wt, st, KB, group_size, xp.data() + m * Kp, a.data() + m * ng, out);
            for (int64_t r = 0; r < 16; ++r)
              yt[m * N + r] = static_cast<scalar_t>(out[r] + off[m * 16 + int4_entry(r)]);
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
