// int4_mm.cuh -- y[M, N] = x[M, K] @ W.T for M = 1..64 with W in 4 bits, dequantized in registers
// straight into tensor-core fragments (the idea of Marlin, Frantar et al. 2024, "MARLIN: Mixed-Precision
// Auto-Regressive Parallel Inference on Large Language Models", on tinyinfer's own layout, int4.cuh).
//
// The weight tile is the A operand of mma.m16n8k16 (16 rows of W x 16 k) and x the B operand (8 rows of
// x per "m-set"; MS sets cover M <= 8 MS), so D^T = W x^T: one dequantized fragment serves MS mmas.
//
// CTA (template C = Int4Tile): WN x WK warps, WN * R 16-row tiles of W. A *stage* covers WK * KPS
// 64-column blocks; warp (wn, wk) owns tiles wn * R .. + R and blocks wk * KPS .. + KPS of every stage.
// Stages stream through a STAGES-deep cp.async pipeline into shared memory: the warps' weight words
// (each copied by the lane that later reads it), the stage's scales and zeros, and x's slice
// (M rows, shared by all warps: one barrier per stage). Weights, scales and zeros of the first
// STAGES - 1 stages are issued before griddepcontrol.wait, x after: so the kernel launched just before
// int4_linear in the stream must not write the weight tensors (the engine writes them once, at load).
// Split-K: grid (ceil(NT / (WN R)), SPLIT) launched as clusters of 1 x SPLIT x 1; CTA y of a cluster
// takes stages [y S / SPLIT, (y + 1) S / SPLIT) and the partial sums meet in distributed shared memory.
//
// Dequantization (per 32-bit word = one A fragment): nibble pairs -> exact integers with one LOP3 and
// one packed add/fma (int4.cuh). Integer zeros with MS <= 2 ("exact"): the mma sums (q - z) x exactly in
// fp32 and the group's scale is applied per group in fp32. Otherwise ("fold") each pair becomes
// w = (q - z) s or q s + m with one more packed fma, rounded once to the activation dtype.
//
// Shared memory per stage: weights [warps][R][KPS][32 lanes][16 B] | scales [tiles][GPS][16] |
// zeros [tiles][GPS][16] | x [8 MS rows][KS * 64 + 32] (the padding makes the row pitch 64 mod 128
// bytes: lanes reading 8 rows hit distinct banks). After the loop it holds the fp32 reduction buffer.
#pragma once

#include <cstdint>

#include "int4.cuh"
#include "ptx.cuh"

namespace tinyinfer {

// Kernel arguments (all shapes; pointers as in Int4LinearParams).
struct Int4MmArgs {
  const void* x;
  const void* qweight;
  const void* scales;
  const void* zeros;
  void* y;
  int M, N, K, KB, NG, NT;  // NT = N / 16 tiles, KB = Kp / 64 blocks, NG = Kp / G groups
  int stages;               // ceil(KB / KS): stages over all of K
  int split;                // cluster size along K (gridDim.y)
  bool x_bf16, scales_bf16;
};

struct Int4SmemPlan {
  int w_bytes, s_bytes, z_bytes, x_pitch, stage_bytes, red_bytes, total_bytes;
};

template <class C, int MS, int G, int ZB>  // ZB: bytes per zero (1: uint8, 2: fp16/bf16 offset)
__host__ __device__ constexpr Int4SmemPlan int4_smem_plan() {
  constexpr int gps = C::KS * int4::kTileK / G;
  constexpr int w = C::kWarps * C::R * C::KPS * 512, s = C::kTiles * gps * 32, z = C::kTiles * gps * 16 * ZB;
  constexpr int pitch = C::KS * int4::kTileK + 32;
  constexpr int stage = w + s + z + 8 * MS * pitch * 2;
  constexpr int red = C::WK * C::kTiles * 8 * MS * 16 * 4;
  return {w, s, z, pitch, stage, red, C::STAGES * stage > red ? C::STAGES * stage : red};
}

// Kernel arguments of one configuration for a call (shapes only; split filled in by the launcher).
template <class C, int G>
inline Int4MmArgs int4_mm_args(const Int4LinearParams& p, int split) {
  Int4MmArgs a{p.x, p.qweight, p.scales, p.zeros, p.y, p.M, p.N, p.K, 0, 0, p.N / int4::kTileN, 0, split,
               p.x_bf16, p.scales_bf16};
  a.KB = (p.K + int4::kTileK - 1) / int4::kTileK;
  a.NG = a.KB * int4::kTileK / G;
  a.stages = (a.KB + C::KS - 1) / C::KS;
  return a;
}
template <class C>
inline int int4_mm_ctas_n(const Int4MmArgs& a) { return (a.NT + C::kTiles - 1) / C::kTiles; }

namespace int4mm {

using namespace int4;

__device__ inline float bits_to_float(uint32_t b16, bool bf16) {
  return bf16 ? __uint_as_float(b16 << 16) : __half2float(__ushort_as_half(static_cast<unsigned short>(b16)));
}
// Two packed 16-bit values of either dtype (src_bf16) as two values of T, each rounded to nearest.
template <typename T>
__device__ inline uint32_t pair_to_t(uint32_t pair, bool src_bf16) {
  if (src_bf16 == is_bf16<T>()) return pair;
  const T lo = from_float<T>(bits_to_float(pair & 0xFFFF, src_bf16));
  const T hi = from_float<T>(bits_to_float(pair >> 16, src_bf16));
  return uint32_t(raw_bits(lo)) | (uint32_t(raw_bits(hi)) << 16);
}

// Word -> A fragment of exact integers q - z (z = 0 for float offsets). Rows g (even registers) and
// g + 8 (odd) have their own zero constants.
template <typename T> struct Ints;
template <> struct Ints<__half> {
  static __device__ void zero(uint32_t z_lo, uint32_t z_hi, uint32_t (&c)[2]) {
    c[0] = fp16_zero_bits(z_lo, 0);
    c[1] = fp16_zero_bits(z_hi, 1);
  }
  static __device__ void get(uint32_t w, const uint32_t (&c)[2], uint32_t (&a)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      a[r] = (r & 1) ? ptx::hfma2(fp16_pair_bits(w, r), kFp16Sixteenth, c[1]) : ptx::hadd2(fp16_pair_bits(w, r), c[0]);
  }
};
template <> struct Ints<__nv_bfloat16> {
  static __device__ void zero(uint32_t z_lo, uint32_t z_hi, uint32_t (&c)[2]) {
    c[0] = bf16_zero_bits(z_lo);
    c[1] = bf16_zero_bits(z_hi);
  }
  static __device__ void get(uint32_t w, const uint32_t (&c)[2], uint32_t (&a)[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = ptx::bfma2(bf16_pair_bits(w, r), kBf16One, c[r & 1]);
  }
};

__device__ inline uint32_t word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

}  // namespace int4mm

template <typename T, Int4Zeros Z, int G, int MS, class C>
__global__ void __launch_bounds__(C::kThreads) int4_mm_kernel(const Int4MmArgs a) {
  using namespace int4mm;
  constexpr int ZB = Z == Int4Zeros::kUint8 ? 1 : 2, GPS = C::KS * kTileK / G, STAGES = C::STAGES;
  constexpr bool kExact = Z == Int4Zeros::kUint8 && MS <= 2;
  constexpr Int4SmemPlan P = int4_smem_plan<C, MS, G, ZB>();
  static_assert((C::KPS * kTileK) % G == 0, "a warp's blocks of a stage must hold whole groups");
  TI_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wn = warp % C::WN, wk = warp / C::WN, nt0 = blockIdx.x * C::kTiles;
  const int split = a.split, rank = blockIdx.y;
  const int s_begin = a.stages * rank / split, nst = a.stages * (rank + 1) / split - s_begin;
  const uint4* qw = static_cast<const uint4*>(a.qweight);
  const char* sc_g = static_cast<const char*>(a.scales);
  const char* z_g = static_cast<const char*>(a.zeros);
  const T* x = static_cast<const T*>(a.x);

  // Weights, scales and zeros of stage s (relative to this CTA's first), as 16-byte copies.
  auto issue_weights = [&](int s) {
    if (s >= nst) return;
    char* st = smem + (s % STAGES) * P.stage_bytes;
    const int kb0 = (s_begin + s) * C::KS, grp0 = kb0 * kTileK / G;
#pragma unroll
    for (int r = 0; r < C::R; ++r)
#pragma unroll
      for (int kp = 0; kp < C::KPS; ++kp) {
        const int nt = nt0 + wn * C::R + r, kb = kb0 + wk * C::KPS + kp;
        const bool ok = nt < a.NT && kb < a.KB;
        ptx::cp_async_16(st + (((warp * C::R + r) * C::KPS + kp) * 32 + lane) * 16,
                         qw + (ok ? (static_cast<size_t>(nt) * a.KB + kb) * 32 + lane : 0), ok);
      }
    constexpr int SCH = C::kTiles * GPS * 2, ZCH = C::kTiles * GPS * ZB;  // chunks per tile-group
    for (int c = tid; c < SCH + ZCH; c += C::kThreads) {
      const bool is_s = c < SCH;
      const int cc = is_s ? c : c - SCH, per = is_s ? 2 : ZB;  // chunks per group
      const int tile = cc / (GPS * per), grp = grp0 + (cc % (GPS * per)) / per, part = cc % per;
      const bool ok = nt0 + tile < a.NT && grp < a.NG;
      const size_t e = (static_cast<size_t>(nt0 + tile) * a.NG + grp) * 16;  // first entry of the group
      const char* src = is_s ? sc_g + (ok ? e * 2 + part * 16 : 0) : z_g + (ok ? e * ZB + part * 16 : 0);
      ptx::cp_async_16(st + (is_s ? P.w_bytes : P.w_bytes + P.s_bytes) + cc * 16, src, ok);
    }
  };
  auto issue_x = [&](int s) {
    if (s >= nst) return;
    T* xs = reinterpret_cast<T*>(smem + (s % STAGES) * P.stage_bytes + P.w_bytes + P.s_bytes + P.z_bytes);
    const int col0 = (s_begin + s) * C::KS * kTileK;
    constexpr int CPR = C::KS * kTileK / 8;  // 16-byte chunks per row
    for (int c = tid; c < a.M * CPR; c += C::kThreads) {
      const int row = c / CPR, col = col0 + (c % CPR) * 8;
      const bool ok = col < a.K;
      ptx::cp_async_16(xs + row * P.x_pitch + (c % CPR) * 8, x + (ok ? static_cast<size_t>(row) * a.K + col : 0), ok);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    issue_weights(s);
    ptx::cp_async_commit();
  }
  ptx::pdl_launch_dependents();
  ptx::pdl_wait();  // x is the previous kernel's output
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    issue_x(s);
    ptx::cp_async_commit();
  }

  float acc[C::R][MS][4] = {};
  float part[kExact ? C::R : 1][MS][4] = {};
  for (int s = 0; s < nst; ++s) {
    ptx::cp_async_wait<STAGES - 2>();  // stage s (and every group before it) has landed
    __syncthreads();                   // ... for every thread; stage s - 1 is free again
    issue_weights(s + STAGES - 1);
    issue_x(s + STAGES - 1);
    ptx::cp_async_commit();
    const char* st = smem + (s % STAGES) * P.stage_bytes;
    const uint4* ws = reinterpret_cast<const uint4*>(st) + warp * C::R * C::KPS * 32 + lane;
    const uint32_t* ss = reinterpret_cast<const uint32_t*>(st + P.w_bytes);
    const char* zs = st + P.w_bytes + P.s_bytes;
    const T* xs = reinterpret_cast<const T*>(zs + P.z_bytes);
#pragma unroll
    for (int kp = 0; kp < C::KPS; ++kp) {
      uint4 w[C::R];
#pragma unroll
      for (int r = 0; r < C::R; ++r) w[r] = ws[(r * C::KPS + kp) * 32];
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // words 2h, 2h + 1: columns [32h, 32h + 32) of the block
        const int col = (wk * C::KPS + kp) * kTileK + 32 * h, gi = col / G;
        uint4 xv[MS];
#pragma unroll
        for (int m = 0; m < MS; ++m)
          xv[m] = 8 * m + g < a.M ? *reinterpret_cast<const uint4*>(xs + (8 * m + g) * P.x_pitch + col + 8 * t)
                                  : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int r = 0; r < C::R; ++r) {
          const int slot = (wn * C::R + r) * GPS + gi;  // (tile, group) in this stage
          const uint32_t sw = ss[slot * 8 + g];       // scales of rows g (low half) and g + 8 (high)
          uint32_t zc[2], sc2[2] = {0, 0}, mc2[2] = {0, 0};
          if (Z == Int4Zeros::kUint8) {
            const uint32_t zw = reinterpret_cast<const uint16_t*>(zs)[slot * 8 + g];
            Ints<T>::zero(zw & 0xFF, zw >> 8, zc);
          } else {  // exact integers q, then w = q s + m
            Ints<T>::zero(0, 0, zc);
            const uint32_t mt = pair_to_t<T>(reinterpret_cast<const uint32_t*>(zs)[slot * 8 + g], a.scales_bf16);
            mc2[0] = ptx::dup_lo(mt);
            mc2[1] = ptx::dup_hi(mt);
          }
          if (!kExact) {
            const uint32_t st2 = pair_to_t<T>(sw, a.scales_bf16);
            sc2[0] = ptx::dup_lo(st2);
            sc2[1] = ptx::dup_hi(st2);
          }
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            uint32_t frag[4];
            Ints<T>::get(word(w[r], 2 * h + jj), zc, frag);
            if (!kExact) {
#pragma unroll
              for (int q = 0; q < 4; ++q) frag[q] = ptx::fma2<T>(frag[q], sc2[q & 1], mc2[q & 1]);
            }
#pragma unroll
            for (int m = 0; m < MS; ++m)
              ptx::mma_16816<T>(kExact ? part[kExact ? r : 0][m] : acc[r][m], frag, word(xv[m], 2 * jj),
                                word(xv[m], 2 * jj + 1));
          }
          if (kExact && (col + 32) % G == 0) {  // end of a group: acc += scale * exact partial sum
            const float s_lo = bits_to_float(sw & 0xFFFF, a.scales_bf16), s_hi = bits_to_float(sw >> 16, a.scales_bf16);
#pragma unroll
            for (int m = 0; m < MS; ++m)
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                acc[r][m][i] = fmaf(i < 2 ? s_lo : s_hi, part[kExact ? r : 0][m][i], acc[r][m][i]);
                part[kExact ? r : 0][m][i] = 0.f;
              }
          }
        }
      }
    }
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the stages are free: reuse them for the reduction

  // D fragment element i of (r, m): W row g + 8 (i >> 1) of the tile, x row 8m + 2t + (i & 1).
  float* red = reinterpret_cast<float*>(smem);  // [WK][tiles][8 MS][16]
  constexpr int OUT = C::kTiles * 8 * MS * 16;
#pragma unroll
  for (int r = 0; r < C::R; ++r)
#pragma unroll
    for (int m = 0; m < MS; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        red[wk * OUT + ((wn * C::R + r) * 8 * MS + 8 * m + 2 * t + (i & 1)) * 16 + g + 8 * (i >> 1)] = acc[r][m][i];
  __syncthreads();
  if (C::WK > 1) {
    for (int e = tid; e < OUT; e += C::kThreads) {
      float sum = red[e];
#pragma unroll
      for (int k = 1; k < C::WK; ++k) sum += red[k * OUT + e];
      red[e] = sum;
    }
    __syncthreads();
  }
  if (split > 1) ptx::cluster_sync();  // every CTA's partial is complete and visible cluster-wide
  T* y = static_cast<T*>(a.y);
  const int e0 = OUT * rank / split, e1 = OUT * (rank + 1) / split;  // this CTA writes its share
  for (int e = e0 + tid; e < e1; e += C::kThreads) {
    const int tile = e / (8 * MS * 16), m = (e / 16) % (8 * MS), n = e % 16;
    if (m >= a.M || nt0 + tile >= a.NT) continue;
    float sum = 0.f;
    for (int q = 0; q < split; ++q) sum += split > 1 ? ptx::cluster_map(red, q)[e] : red[e];
    y[static_cast<size_t>(m) * a.N + (nt0 + tile) * kTileN + n] = from_float<T>(sum);
  }
  if (split > 1) ptx::cluster_sync();  // no CTA leaves while another still reads its shared memory
}


}  // namespace tinyinfer
