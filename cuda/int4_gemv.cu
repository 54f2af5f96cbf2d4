// int4_gemv.cu -- y[M, N] = x[M, K] @ W.T with W stored in 4 bits: w = (q - z) * s per group of G.
//
// Decode is memory-bound: at M = 1..16 every weight byte is used by only M multiply-adds, so the kernel
// is a stream of the packed weights (0.5 byte each) at full memory bandwidth; arithmetic is kept small
// enough that it hides under the loads.
//
// Layout (tinyinfer/quant.py, index math in cuda/int4.cuh):
//   x        (M, K) fp16 | bf16, rows contiguous, 16-byte aligned
//   qweight  (N/16, Kp/64, 32 lanes, 4 words) int32 -- tile (nt, kb) is 512 contiguous bytes
//   scales   (N/16, Kp/G, 16) fp16 | bf16 (their own dtype); entry 2r+h is row r + 8h of the tile
//   zeros    (N/16, Kp/G, 16) uint8 integer zero points
//   y        (M, N) in x's dtype
//
// GEMV (M <= 16), `int4_gemv_kernel`: one CTA of 8 warps per 16-row tile of W, the warps splitting K
// (whole groups each) and reducing through shared memory at the end. Each lane streams 16-byte words
// of W (U of them in flight), dequantizes nibble pairs with bit tricks into the A operand of a
// tensor-core mma.m16n8k16 whose B operand is x (8 rows; M > 8 uses a second mma), accumulates the
// integer-weight products of one group in fp32 and adds them times the group's scale (one FFMA per
// output per group; scales and zeros are read once per group). Grid: N/16 CTAs (>= 256 for N >= 4096,
// i.e. about two per SM on 132 SMs, all resident at once).
//
// Dequantize (M > 16, prefill), `int4_dequant_kernel`: one warp per tile writes W (N, K) in x's dtype
// into a scratch buffer for the dense matmul. Grid: (Kp/64, N/16 / 4), 4 warps per CTA.
//
// Build: part of the extension (tinyinfer/kernels.py); `make build` prints the ptxas report.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int4.cuh"

namespace tinyinfer {

namespace {

using namespace int4;

constexpr int kWarps = 8;

// --- per-dtype pieces: dequant of one word into an A fragment, and the mma ----------------------

template <typename T> struct Int4Math;

template <> struct Int4Math<__half> {
  // Zero-point constants of a lane for one group: rows g (even registers) and g + 8 (odd ones).
  struct Zero { uint32_t even, odd; };
  static __device__ Zero zero(uint32_t z_lo, uint32_t z_hi) {
    return {fp16_zero_bits(z_lo, 0), fp16_zero_bits(z_hi, 1)};
  }
  static __device__ void dequant(uint32_t w, Zero z, uint32_t a[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint32_t p = fp16_pair_bits(w, r);
      if (r & 1) {
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(a[r]) : "r"(p), "r"(kFp16Sixteenth), "r"(z.odd));
      } else {
        asm("add.rn.f16x2 %0, %1, %2;" : "=r"(a[r]) : "r"(p), "r"(z.even));
      }
    }
  }
  static __device__ void mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Int4Math<__nv_bfloat16> {
  struct Zero { uint32_t even, odd; };
  static __device__ Zero zero(uint32_t z_lo, uint32_t z_hi) { return {bf16_zero_bits(z_lo), bf16_zero_bits(z_hi)}; }
  static __device__ void dequant(uint32_t w, Zero z, uint32_t a[4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const uint32_t p = bf16_pair_bits(w, r);
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(a[r]) : "r"(p), "r"(kBf16One), "r"((r & 1) ? z.odd : z.even));
    }
  }
  static __device__ void mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Weights are read exactly once: stream them past L1 so that x (re-read by every CTA) stays there.
__device__ inline uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Programmatic dependent launch (sm_90+): this kernel may start while the previous kernel in the
// stream finishes. Before `wait` it touches only the weights (read-only, never produced on the GPU
// during decode); x is read and y written after it. No-ops when launched without the attribute.
__device__ inline void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ inline void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ inline void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }

__device__ inline uint32_t word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// --- GEMV -----------------------------------------------------------------------------------------

// T: activation dtype; S: scale dtype; G: group size; MSETS: 1 (M <= 8) or 2 (M <= 16) mma column sets.
template <typename T, typename S, int G, int MSETS>
__global__ void __launch_bounds__(kWarps * 32, 2)
int4_gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight, const S* __restrict__ scales,
                 const uint8_t* __restrict__ zeros, T* __restrict__ y, int M, int N, int K, int KB, int NG) {
  using Math = Int4Math<T>;
  constexpr int U = MSETS == 1 ? 4 : 2;          // 16-byte weight loads in flight per lane
  constexpr int BPG = G >= kTileK ? G / kTileK : 1;  // 64-column blocks per group (a warp's unit)
  constexpr int GPB = G >= kTileK ? 1 : kTileK / G;  // groups per block
  static_assert(U % BPG == 0, "an iteration must cover whole groups");
  __shared__ float partial[kWarps][16][16];      // [warp][m][n] fp32 partial sums

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x;

  // This warp's blocks: an even share of the K/64 blocks, in whole groups.
  const int units = KB / BPG;
  const int kb_begin = (units * warp / kWarps) * BPG, kb_end = (units * (warp + 1) / kWarps) * BPG;

  const uint4* wp = qweight + static_cast<size_t>(nt) * KB * 32 + lane;
  const uint32_t* sp = reinterpret_cast<const uint32_t*>(scales + static_cast<size_t>(nt) * NG * 16) + g;
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zeros + static_cast<size_t>(nt) * NG * 16) + g;
  // The B operand of mma set s is x row 8s + g; rows past M are zeros.
  const T* xrow[MSETS];
  bool xvalid[MSETS];
#pragma unroll
  for (int s = 0; s < MSETS; ++s) {
    xvalid[s] = 8 * s + g < M;
    xrow[s] = x + static_cast<size_t>(xvalid[s] ? 8 * s + g : 0) * K + 8 * t;
  }

  // Pull this warp's first tiles into L2 while the previous kernel still runs (PDL), then wait for it.
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (kb_begin + u < kb_end) prefetch_l2(wp + static_cast<size_t>(kb_begin + u) * 32);
  }
  pdl_launch_dependents();
  pdl_wait();

  float acc[MSETS][4] = {};
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += U) {
    // Issue every load of this iteration before any math: weights, x, then scales and zeros.
    uint4 w[U], xv[MSETS][U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      w[u] = kb0 + u < kb_end ? load_stream(wp + static_cast<size_t>(kb0 + u) * 32) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int s = 0; s < MSETS; ++s)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int k = (kb0 + u) * kTileK + 32 * h;   // K is a multiple of 32: a run is in or out
          xv[s][u][h] = xvalid[s] && kb0 + u < kb_end && k < K
                            ? __ldg(reinterpret_cast<const uint4*>(xrow[s] + k)) : make_uint4(0, 0, 0, 0);
        }
    constexpr int kGroups = U * GPB / BPG;          // groups this iteration touches
    uint32_t sv[kGroups];
    uint16_t zv[kGroups];
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const int grp = kb0 * GPB / BPG + i;
      const bool live = grp < NG;
      sv[i] = live ? __ldg(sp + static_cast<size_t>(grp) * 8) : 0u;
      zv[i] = live ? __ldg(zp + static_cast<size_t>(grp) * 8) : uint16_t(0);
    }

#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kb0 + u >= kb_end) break;
#pragma unroll
      for (int h = 0; h < 2; ++h) {                 // words 2h, 2h+1: k in [32h, 32h + 32)
        const int gi = (u * kTileK + 32 * h) / G;
        const typename Math::Zero zero = Math::zero(zv[gi] & 0xFF, zv[gi] >> 8);
        float part[MSETS][4] = {};
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * h + jj;
          uint32_t a[4];
          Math::dequant(word(w[u], j), zero, a);
#pragma unroll
          for (int s = 0; s < MSETS; ++s) {
            Math::mma(part[s], a, word(xv[s][u][h], 2 * jj), word(xv[s][u][h], 2 * jj + 1));
          }
        }
        // The products so far are (q - z) * x exactly summed in fp32; now apply the group's scale.
        const S* sc = reinterpret_cast<const S*>(&sv[gi]);
        const float s_lo = to_float(sc[0]), s_hi = to_float(sc[1]);
#pragma unroll
        for (int s = 0; s < MSETS; ++s) {
          acc[s][0] = fmaf(s_lo, part[s][0], acc[s][0]);
          acc[s][1] = fmaf(s_lo, part[s][1], acc[s][1]);
          acc[s][2] = fmaf(s_hi, part[s][2], acc[s][2]);
          acc[s][3] = fmaf(s_hi, part[s][3], acc[s][3]);
        }
      }
    }
  }

  // D fragment: acc[s][0..1] are rows n = g, columns m = 8s + 2t + {0, 1}; acc[s][2..3] rows g + 8.
#pragma unroll
  for (int s = 0; s < MSETS; ++s) {
    partial[warp][8 * s + 2 * t][g] = acc[s][0];
    partial[warp][8 * s + 2 * t + 1][g] = acc[s][1];
    partial[warp][8 * s + 2 * t][g + 8] = acc[s][2];
    partial[warp][8 * s + 2 * t + 1][g + 8] = acc[s][3];
  }
  __syncthreads();
  const int m = threadIdx.x >> 4, n = threadIdx.x & 15;
  if (m < M) {
    float sum = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) sum += partial[w2][m][n];
    y[static_cast<size_t>(m) * N + nt * kTileN + n] = from_float<T>(sum);
  }
}

// --- dequantize (prefill) -------------------------------------------------------------------------

template <typename T, typename S, int G>
__global__ void __launch_bounds__(128)
int4_dequant_kernel(const uint4* __restrict__ qweight, const S* __restrict__ scales,
                    const uint8_t* __restrict__ zeros, T* __restrict__ out, int N, int K, int KB, int NG) {
  const int lane = threadIdx.x & 31;
  const int kb = blockIdx.x, nt = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (nt * kTileN >= N) return;
  const uint4 w = load_stream(qweight + (static_cast<size_t>(nt) * KB + kb) * 32 + lane);
#pragma unroll
  for (int h = 0; h < 2; ++h) {                     // words 2h, 2h+1: columns 32h + 8t + [0, 8)
    const int k0 = kb * kTileK + x_k(lane, h, 0);
    if (k0 >= K) break;
    const int grp = (kb * kTileK + 32 * h) / G;
    float s[2], z[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const size_t e = (static_cast<size_t>(nt) * NG + grp) * 16 + pair_index(nibble_row(lane, rh));
      s[rh] = to_float(scales[e]);
      z[rh] = static_cast<float>(zeros[e]);
    }
    alignas(16) T vals[2][8];                       // [row g or g + 8][column 8t + e]
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const uint32_t v = word(w, 2 * h + jj);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = nibble_k(lane, 2 * h + jj, i) - x_k(lane, h, 0);
        const float q = static_cast<float>((v >> (4 * i)) & 0xF);
        vals[i & 1][e] = from_float<T>((q - z[i & 1]) * s[i & 1]);
      }
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const size_t row = static_cast<size_t>(nt) * kTileN + nibble_row(lane, rh);
      *reinterpret_cast<uint4*>(out + row * K + k0) = *reinterpret_cast<const uint4*>(vals[rh]);
    }
  }
}

// --- dispatch -------------------------------------------------------------------------------------

template <typename T, typename S>
cudaError_t launch_typed(const Int4GemvParams& p, cudaStream_t stream) {
  const int KB = (p.K + kTileK - 1) / kTileK, NG = KB * kTileK / p.group_size, NT = p.N / kTileN;
  const auto* qw = static_cast<const uint4*>(p.qweight);
  const auto* sc = static_cast<const S*>(p.scales);
  const auto* x = static_cast<const T*>(p.x);
  auto* y = static_cast<T*>(p.y);
  // Launched with the programmatic-stream-serialization attribute on sm_90+ (p.pdl), see pdl_wait.
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(NT);
  cfg.blockDim = dim3(kWarps * 32);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  cudaError_t err = cudaSuccess;
#define TINYINFER_GEMV(G, MS) \
  err = cudaLaunchKernelEx(&cfg, int4_gemv_kernel<T, S, G, MS>, x, qw, sc, p.zeros, y, p.M, p.N, p.K, KB, NG)
#define TINYINFER_GEMV_G(MS)                                   \
  switch (p.group_size) {                                      \
    case 32: TINYINFER_GEMV(32, MS); break;                    \
    case 64: TINYINFER_GEMV(64, MS); break;                    \
    case 128: TINYINFER_GEMV(128, MS); break;                  \
    default: return cudaErrorInvalidValue;                     \
  }
  if (p.M <= 8) {
    TINYINFER_GEMV_G(1)
  } else {
    TINYINFER_GEMV_G(2)
  }
#undef TINYINFER_GEMV_G
#undef TINYINFER_GEMV
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T, typename S>
cudaError_t launch_dequant_typed(const Int4GemvParams& p, cudaStream_t stream) {
  const int KB = (p.K + kTileK - 1) / kTileK, NG = KB * kTileK / p.group_size, NT = p.N / kTileN;
  const dim3 grid(KB, (NT + 3) / 4), block(128);
  const auto* qw = static_cast<const uint4*>(p.qweight);
  const auto* sc = static_cast<const S*>(p.scales);
  auto* out = static_cast<T*>(p.y);
  switch (p.group_size) {
    case 32: int4_dequant_kernel<T, S, 32><<<grid, block, 0, stream>>>(qw, sc, p.zeros, out, p.N, p.K, KB, NG); break;
    case 64: int4_dequant_kernel<T, S, 64><<<grid, block, 0, stream>>>(qw, sc, p.zeros, out, p.N, p.K, KB, NG); break;
    case 128: int4_dequant_kernel<T, S, 128><<<grid, block, 0, stream>>>(qw, sc, p.zeros, out, p.N, p.K, KB, NG); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_int4_gemv_once(const Int4GemvParams& p, cudaStream_t stream) {
  if (p.x_bf16) return p.scales_bf16 ? launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream)
                                     : launch_typed<__nv_bfloat16, __half>(p, stream);
  return p.scales_bf16 ? launch_typed<__half, __nv_bfloat16>(p, stream) : launch_typed<__half, __half>(p, stream);
}

}  // namespace

cudaError_t launch_int4_gemv(const Int4GemvParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.M > 16) return cudaErrorInvalidValue;
  cudaError_t err = launch_int4_gemv_once(p, stream);
  if (err != cudaSuccess && p.pdl) {     // a driver refusing the PDL attribute: plain launch instead
    cudaGetLastError();
    Int4GemvParams plain = p;
    plain.pdl = false;
    err = launch_int4_gemv_once(plain, stream);
  }
  return err;
}

cudaError_t launch_int4_dequant(const Int4GemvParams& p, cudaStream_t stream) {
  if (p.x_bf16) return p.scales_bf16 ? launch_dequant_typed<__nv_bfloat16, __nv_bfloat16>(p, stream)
                                     : launch_dequant_typed<__nv_bfloat16, __half>(p, stream);
  return p.scales_bf16 ? launch_dequant_typed<__half, __nv_bfloat16>(p, stream)
                       : launch_dequant_typed<__half, __half>(p, stream);
}

}  // namespace tinyinfer
