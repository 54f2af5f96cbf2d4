// int4_linear.cu -- y[M, N] = x[M, K] @ W.T with W stored in 4 bits per group of G columns:
// w = (q - z) s (uint8 zero points) or w = q s + m (float offsets, GGUF Q4_1). Layout: cuda/int4.cuh.
//
//   M <= 64: the tensor-core kernel of cuda/int4_mm.cuh in the configuration cuda/tuned.cuh gives for
//            M's range (1-8, 9-16: GEMV-shaped, memory-bound; 17-32, 33-64: GEMM-shaped), launched by
//            cuda/int4_launch.cuh (split-K clusters, programmatic dependent launch).
//   M > 64:  `int4_dequant_kernel` writes W (N, K) in x's dtype into a scratch buffer (one warp per
//            16 x 64 tile, 16-byte stores; w computed in fp32 and rounded once) and bindings.cpp calls
//            the dense matmul. Grid (Kp / 64, ceil(N / 16 / 4)), 4 warps per CTA.
//
// Host emulation: with TINYINFER_EMULATE defined (tests/host/emulate_int4.cpp) only the kernels compile.
#ifdef TINYINFER_EMULATE
#include "emulate_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "int4_launch.cuh"
#include "tuned.cuh"
#endif

#include <cstdint>

#include "int4_mm.cuh"

namespace tinyinfer {

// W (N, K) in T from the kernel layout; scales and zeros as raw 16-bit words / bytes.
template <typename T, Int4Zeros Z, int G>
__global__ void __launch_bounds__(128)
int4_dequant_kernel(const uint4* __restrict__ qweight, const uint16_t* __restrict__ scales,
                    const void* __restrict__ zeros, T* __restrict__ out, int N, int K, int KB, int NG,
                    bool scales_bf16) {
  using namespace int4;
  const int lane = threadIdx.x & 31;
  const int kb = blockIdx.x, nt = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (nt * kTileN >= N) return;
  const uint4 w = ptx::ld_stream(qweight + (static_cast<size_t>(nt) * KB + kb) * 32 + lane);
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // words 2h, 2h+1: columns 32h + 8t + [0, 8)
    const int k0 = kb * kTileK + x_k(lane, h, 0);
    if (k0 >= K) break;
    const int grp = (kb * kTileK + 32 * h) / G;
    float s[2], z[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const size_t e = (static_cast<size_t>(nt) * NG + grp) * 16 + pair_index(nibble_row(lane, rh));
      s[rh] = int4mm::bits_to_float(scales[e], scales_bf16);
      z[rh] = Z == Int4Zeros::kUint8 ? static_cast<float>(static_cast<const uint8_t*>(zeros)[e])
                                     : int4mm::bits_to_float(static_cast<const uint16_t*>(zeros)[e], scales_bf16);
    }
    alignas(16) T vals[2][8];  // [row g or g + 8][column 8t + e]
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const uint32_t v = int4mm::word(w, 2 * h + jj);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int e = nibble_k(lane, 2 * h + jj, i) - x_k(lane, h, 0);
        const float q = static_cast<float>((v >> (4 * i)) & 0xF);
        vals[i & 1][e] = from_float<T>(Z == Int4Zeros::kUint8 ? (q - z[i & 1]) * s[i & 1]
                                                               : fmaf(q, s[i & 1], z[i & 1]));
      }
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const size_t row = static_cast<size_t>(nt) * kTileN + nibble_row(lane, rh);
      *reinterpret_cast<uint4*>(out + row * K + k0) = *reinterpret_cast<const uint4*>(vals[rh]);
    }
  }
}

#ifndef TINYINFER_EMULATE
namespace {

// The shipped configuration for M's range.
template <typename T, Int4Zeros Z, int G>
cudaError_t launch_for_m(const Int4LinearParams& p, cudaStream_t stream) {
  constexpr float fill = tuned::kInt4SplitFill;
  if (p.M <= 8) return launch_int4_mm<T, Z, G, 1, tuned::Int4M8>(p, 0, fill, stream);
  if (p.M <= 16) return launch_int4_mm<T, Z, G, 2, tuned::Int4M16>(p, 0, fill, stream);
  if (p.M <= 32) return launch_int4_mm<T, Z, G, 4, tuned::Int4M32>(p, 0, fill, stream);
  return launch_int4_mm<T, Z, G, 8, tuned::Int4M64>(p, 0, fill, stream);
}

template <typename T, Int4Zeros Z>
cudaError_t launch_for_g(const Int4LinearParams& p, cudaStream_t stream) {
  switch (p.group_size) {
    case 32: return launch_for_m<T, Z, 32>(p, stream);
    case 64: return launch_for_m<T, Z, 64>(p, stream);
    case 128: return launch_for_m<T, Z, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, Int4Zeros Z>
cudaError_t launch_dequant_typed(const Int4LinearParams& p, cudaStream_t stream) {
  const int KB = (p.K + int4::kTileK - 1) / int4::kTileK, NG = KB * int4::kTileK / p.group_size;
  const dim3 grid(KB, (p.N / int4::kTileN + 3) / 4), block(128);
  const auto* qw = static_cast<const uint4*>(p.qweight);
  const auto* sc = static_cast<const uint16_t*>(p.scales);
  auto* out = static_cast<T*>(p.y);
#define TINYINFER_DEQUANT(G) \
  int4_dequant_kernel<T, Z, G><<<grid, block, 0, stream>>>(qw, sc, p.zeros, out, p.N, p.K, KB, NG, p.scales_bf16)
  switch (p.group_size) {
    case 32: TINYINFER_DEQUANT(32); break;
    case 64: TINYINFER_DEQUANT(64); break;
    case 128: TINYINFER_DEQUANT(128); break;
    default: return cudaErrorInvalidValue;
  }
#undef TINYINFER_DEQUANT
  return cudaGetLastError();
}

}  // namespace

// y = x @ W.T for 1 <= M <= 64 (the binding routes larger M through launch_int4_dequant + matmul).
cudaError_t launch_int4_linear(const Int4LinearParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.M > 64) return cudaErrorInvalidValue;
  const bool f = p.zero_kind == Int4Zeros::kFloat;
  if (p.x_bf16) return f ? launch_for_g<__nv_bfloat16, Int4Zeros::kFloat>(p, stream)
                         : launch_for_g<__nv_bfloat16, Int4Zeros::kUint8>(p, stream);
  return f ? launch_for_g<__half, Int4Zeros::kFloat>(p, stream) : launch_for_g<__half, Int4Zeros::kUint8>(p, stream);
}

// W (N, K) in x's dtype into p.y.
cudaError_t launch_int4_dequant(const Int4LinearParams& p, cudaStream_t stream) {
  const bool f = p.zero_kind == Int4Zeros::kFloat;
  if (p.x_bf16) return f ? launch_dequant_typed<__nv_bfloat16, Int4Zeros::kFloat>(p, stream)
                         : launch_dequant_typed<__nv_bfloat16, Int4Zeros::kUint8>(p, stream);
  return f ? launch_dequant_typed<__half, Int4Zeros::kFloat>(p, stream)
           : launch_dequant_typed<__half, Int4Zeros::kUint8>(p, stream);
}
#endif  // TINYINFER_EMULATE

}  // namespace tinyinfer
