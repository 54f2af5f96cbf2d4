// emulate_ptx.h -- host implementations of the device functions of cuda/ptx.cuh, included by it when
// TINYINFER_EMULATE is defined (after emulate_cuda.h). Each follows the PTX ISA's definition:
//   - mma_16816: every lane gathers all 32 lanes' A/B fragments (warp_gather), rebuilds the 16x16 A and
//     16x8 B matrices from the documented fragment layouts and computes its four D elements, products
//     summed in double precision and rounded to fp32 once (the hardware's internal order differs;
//     tests compare within fp32-accumulation tolerances);
//   - ldmatrix: lanes gather the row addresses of lanes 8i .. 8i + 7 (matrix i) and pick their
//     elements, transposed for .trans;
//   - packed f16x2 / bf16x2 fma / add: exact in double, one rounding to nearest even;
//   - clusters: rank, barrier over the cluster's fibers, mapa = same offset in the other CTA's smem;
//   - cp.async: emulate_cuda.h's deferred copies; griddepcontrol: no-ops (one kernel at a time);
//   - ex2.approx: std::exp2.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emulate_cuda.h"

namespace tinyinfer {
namespace ptx {

namespace detail {

inline double half_to_double(uint16_t b) { __half h{b}; return __half2float(h); }
inline double bf16_to_double(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// Round a double to the nearest representable value with `mant` fraction bits (ties to even),
// `min_exp` the smallest normal exponent; returns the bit pattern of the 16-bit format.
inline uint16_t round16(double x, int mant, int min_exp, int exp_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const uint16_t sign = std::signbit(x) ? uint16_t(1u << 15) : 0;
  if (std::isnan(x)) return uint16_t(sign | (((1u << exp_bits) - 1) << mant) | (1u << (mant - 1)));
  double a = std::fabs(x);
  if (a == 0.0) return sign;
  int e;
  std::frexp(a, &e);                      // a = f * 2^e, f in [0.5, 1): exponent of a is e - 1
  const int q = std::max(e - 1, min_exp) - mant;  // value of one unit in the last place
  const double units = std::nearbyint(std::ldexp(a, -q));  // default rounding mode: to nearest even
  if (units == 0.0) return sign;                      // underflow to a signed zero
  a = std::ldexp(units, q);
  std::frexp(a, &e);
  const int exp = e - 1;
  if (exp > bias) return uint16_t(sign | (((1u << exp_bits) - 1) << mant));  // overflow: infinity
  if (exp < min_exp) return uint16_t(sign | static_cast<uint16_t>(units));     // subnormal
  const uint32_t frac = static_cast<uint32_t>(std::ldexp(a, mant - exp)) - (1u << mant);
  return uint16_t(sign | (uint32_t(exp + bias) << mant) | frac);
}
inline uint16_t double_to_half(double x) { return round16(x, 10, -14, 5); }
inline uint16_t double_to_bf16(double x) { return round16(x, 7, -126, 8); }

inline double elem(uint32_t reg, int h, bool bf16) {
  const uint16_t b = static_cast<uint16_t>(reg >> (16 * h));
  return bf16 ? bf16_to_double(b) : half_to_double(b);
}

struct MmaOperands { uint32_t a[4], b[2]; };

inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}}, all[32];
  emu::warp_gather(mine, all);
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] = elem(all[l].a[r], h, bf16);
    for (int b = 0; b < 2; ++b)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * b][g] = elem(all[l].b[b], h, bf16);
  }
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = d[i];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = static_cast<float>(s);
  }
}

template <int NMAT>
inline void ldmatrix(uint32_t* r, const void* row, bool trans) {
  const void* all[32];
  emu::warp_gather(row, all);
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int i = 0; i < NMAT; ++i) {
    uint16_t v[2];
    for (int h = 0; h < 2; ++h) {
      // non-trans: row lane / 4, column 2 (lane % 4) + h; trans: row 2 (lane % 4) + h, column lane / 4
      const int mrow = trans ? 2 * (lane % 4) + h : lane / 4, mcol = trans ? lane / 4 : 2 * (lane % 4) + h;
      std::memcpy(&v[h], static_cast<const char*>(all[8 * i + mrow]) + 2 * mcol, 2);
    }
    r[i] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
  }
}

}  // namespace detail

template <typename T> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(d, a, b0, b1, false);
}
template <> inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(d, a, b0, b1, true);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldmatrix<4>(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { detail::ldmatrix<4>(r, row, true); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { detail::ldmatrix<2>(r, row, false); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { detail::ldmatrix<2>(r, row, true); }

inline void cp_async_16(void* smem, const void* gmem, bool valid) { emu::cp_async_16(smem, gmem, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { emu::cp_async_wait(N); }

inline uint4 ld_stream(const void* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
inline void prefetch_l2(const void*) {}
inline void pdl_wait() {}
inline void pdl_launch_dependents() {}

inline int cluster_rank() { return emu::current->cluster_rank; }
inline void cluster_sync() { emu::barrier_wait(*emu::cluster_barrier); }
template <typename P>
inline P* cluster_map(P* p, int rank) {
  const char* base = emu::current->cta->smem;
  const ptrdiff_t offset = reinterpret_cast<const char*>(p) - base;
  return reinterpret_cast<P*>((*emu::cluster_ctas)[rank].smem + offset);
}

inline uint32_t packed(double lo, double hi, bool bf16) {
  const uint16_t l = bf16 ? detail::double_to_bf16(lo) : detail::double_to_half(lo);
  const uint16_t h = bf16 ? detail::double_to_bf16(hi) : detail::double_to_half(hi);
  return uint32_t(l) | (uint32_t(h) << 16);
}
inline uint32_t fma_packed(uint32_t a, uint32_t b, uint32_t c, bool bf16) {
  using detail::elem;
  return packed(elem(a, 0, bf16) * elem(b, 0, bf16) + elem(c, 0, bf16),
                elem(a, 1, bf16) * elem(b, 1, bf16) + elem(c, 1, bf16), bf16);
}
inline uint32_t hadd2(uint32_t a, uint32_t b) {
  using detail::elem;
  return packed(elem(a, 0, false) + elem(b, 0, false), elem(a, 1, false) + elem(b, 1, false), false);
}
inline uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) { return fma_packed(a, b, c, false); }
inline uint32_t bfma2(uint32_t a, uint32_t b, uint32_t c) { return fma_packed(a, b, c, true); }

inline float ex2(float x) { return std::exp2(x); }

}  // namespace ptx
}  // namespace tinyinfer
