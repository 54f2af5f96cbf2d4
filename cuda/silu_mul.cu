// silu_mul.cu -- SwiGLU's activation in one launch: y = silu(gate) * up, for x = [gate | up], the output
// of the MLP's fused gate/up projection (Shazeer, "GLU Variants Improve Transformer", 2020).
//
//     y[t, i] = R(R(g / (1 + exp(-g))) * u)      g = x[t, i], u = x[t, F + i], i < F
//
// with R the rounding to the model dtype: the same two roundings as the two tensor ops it replaces
// (F.silu, then the product), each computed in fp32 with expf (not __expf), so the output is the bits
// the unfused ops give on a GPU. Two kernels per layer of every decode step become one.
//
// Memory layout: x (T, 2F) with any row stride and unit-stride columns (the projection's output);
// y (T, F) contiguous; fp32, fp16 or bf16.
// Launch shape: grid (T, ceil(F / (N * 128))), 128 threads; each thread one vector of N values (16
// bytes when F and the rows are 16-byte aligned, else one value). From shapes only: CUDA-graph safe.
//
// Build: through tinyinfer/extensions/ (`make build`, or JIT at first use); no torch headers here.
// Host emulation: with TINYINFER_EMULATE defined (tests/host/emulate_silu_mul.cpp) the kernel compiles
// for the CPU.
#ifdef TINYINFER_EMULATE
#include "emulate_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "fused.cuh"

namespace tinyinfer {

constexpr int kSiluMulThreads = 128;

template <typename T, int N>
struct alignas(sizeof(T) * N) SiluPack {
  T v[N];
};

// One value: silu rounded to T (as F.silu's output tensor), then the product rounded to T.
template <typename T>
__device__ inline T silu_mul_value(T gate, T up) {
  const float g = to_float(gate);
  const float s = to_float(from_float<T>(g / (1.0f + expf(-g))));
  return from_float<T>(s * to_float(up));
}

template <typename T, int N>
__global__ void __launch_bounds__(kSiluMulThreads) silu_mul_kernel(const SiluMulParams p) {
  const int64_t t = blockIdx.x;
  const int64_t i = (static_cast<int64_t>(blockIdx.y) * kSiluMulThreads + threadIdx.x) * N;
  if (i >= p.width) return;
  const T* row = static_cast<const T*>(p.x) + t * p.x_row_stride;
  const SiluPack<T, N> g = *reinterpret_cast<const SiluPack<T, N>*>(row + i);
  const SiluPack<T, N> u = *reinterpret_cast<const SiluPack<T, N>*>(row + p.width + i);
  SiluPack<T, N> y;
#pragma unroll
  for (int k = 0; k < N; ++k) y.v[k] = silu_mul_value(g.v[k], u.v[k]);
  *reinterpret_cast<SiluPack<T, N>*>(static_cast<T*>(p.y) + t * p.width + i) = y;
}

#ifndef TINYINFER_EMULATE
namespace {

template <typename T, int N>
cudaError_t launch_vectors(const SiluMulParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(p.num_tokens),
                  static_cast<unsigned int>((p.width / N + kSiluMulThreads - 1) / kSiluMulThreads));
  silu_mul_kernel<T, N><<<grid, kSiluMulThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const SiluMulParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = p.width % kVec == 0 && p.x_row_stride % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0;
  return aligned ? launch_vectors<T, kVec>(p, stream) : launch_vectors<T, 1>(p, stream);
}

}  // namespace

cudaError_t launch_silu_and_mul(const SiluMulParams& p, FusedDtype dtype, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return launch_for_dtype(dtype, [&](auto t) { return launch_typed<decltype(t)>(p, stream); });
}
#endif  // TINYINFER_EMULATE

}  // namespace tinyinfer
