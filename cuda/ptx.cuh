// ptx.cuh -- every inline-PTX instruction tinyinfer's kernels use, each behind one small device
// function, so that the kernels read as C++ and the host emulator (tests/host/emulate_ptx.h) can
// substitute an exact implementation of each one (PTX ISA 8.x, sections named per function).
//
//   tensor cores   mma_16816<T>      mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//                  ldmatrix_x4/_x2   ldmatrix.sync.aligned.m8n8.x{4,2}[.trans].shared.b16
//   async copies   cp_async_16       cp.async.cg.shared.global (16 bytes, zero-fill when !valid)
//                  cp_async_commit / cp_async_wait<N>   commit_group / wait_group
//   loads          ld_stream         ld.global.nc.L1::no_allocate.v4.u32 (read-once weights)
//                  prefetch_l2       prefetch.global.L2
//   launch         pdl_wait / pdl_launch_dependents   griddepcontrol.{wait,launch_dependents}
//   clusters       cluster_rank / cluster_sync / cluster_map   %cluster_ctarank, barrier.cluster,
//                                                              mapa (distributed shared memory)
//   packed math    hadd2 / hfma2 / bfma2 on 32-bit registers holding two f16 / bf16 values
//   special        ex2               ex2.approx.ftz.f32
//
// Fragment layouts (mma.m16n8k16, lane = 4 * g + t): A register r holds row g + 8 * (r & 1), columns
// 2t, 2t + 1 (+ 8 for r >= 2); B register b holds rows (k) 2t, 2t + 1 (+ 8 for b = 1) of column g;
// D holds rows g (d0, d1) and g + 8 (d2, d3), columns 2t, 2t + 1. ldmatrix: lanes 8i .. 8i + 7 give the
// 16-byte row addresses of matrix i; lane l receives row l / 4, columns 2 (l % 4) + {0, 1} of each
// matrix (.trans: column l / 4, rows 2 (l % 4) + {0, 1}). tests/host/emulate_ptx.cpp checks the emulated
// versions against plain matrix products.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef TINYINFER_EMULATE
#include "emulate_ptx.h"  // host implementations, same names and semantics (tests/host/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The kernel's dynamic shared memory as a char array (the emulator gives each CTA its own buffer).
#define TI_DYNAMIC_SMEM(name) extern __shared__ __align__(16) char name[]

namespace tinyinfer {
namespace ptx {

// ---- tensor cores ------------------------------------------------------------------------------------

// d += A (16x16, row) * B (16x8, col) with fp32 accumulation; T (__half or __nv_bfloat16) names the
// type of the A and B elements.
template <typename T>
__device__ inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Four 8x8 b16 matrices; `row` is this lane's row address (lane 8i + j: row j of matrix i).
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
// Two matrices: lanes 0-15 give the row addresses (the others' are ignored but must be valid).
__device__ inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}

// ---- asynchronous copies -----------------------------------------------------------------------------

// 16-byte global -> shared copy past L1; with valid = false it writes 16 zero bytes and reads nothing
// (src must still be a mapped address).
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ---- loads -------------------------------------------------------------------------------------------

// Data read exactly once (weights): bypass L1 so that re-read data (activations) stays there.
__device__ inline uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ inline void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// ---- programmatic dependent launch (sm_90; no-ops when launched without the attribute) -------------

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

// ---- thread-block clusters (sm_90) ---------------------------------------------------------------------

__device__ inline int cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
}
// Barrier over every thread of the cluster, ordering shared-memory writes before it for readers after.
__device__ inline void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The address of the same shared-memory variable in cluster CTA `rank` (a generic pointer).
template <typename P>
__device__ inline P* cluster_map(P* p, int rank) {
  uint64_t out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<P*>(out);
}

// ---- packed f16x2 / bf16x2 arithmetic on raw registers ------------------------------------------------

__device__ inline uint32_t hadd2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ inline uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ inline uint32_t bfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// 2^x, approximate (2 ulp), flushing subnormals; ex2(-inf) = +0.
__device__ inline float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace ptx
}  // namespace tinyinfer
#endif  // TINYINFER_EMULATE

namespace tinyinfer {

// Element conversions (round to nearest even) and raw bits, shared by every kernel.
__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ inline uint16_t raw_bits(__half x) { return __half_as_ushort(x); }
__device__ inline uint16_t raw_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T> __host__ __device__ constexpr bool is_bf16() { return std::is_same<T, __nv_bfloat16>::value; }

namespace ptx {

// fma on two packed values of the type T names (__half -> f16x2, __nv_bfloat16 -> bf16x2).
template <typename T> __device__ inline uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <> __device__ inline uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) { return hfma2(a, b, c); }
template <> __device__ inline uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  return bfma2(a, b, c);
}

// Both halves of a register set to its low (or high) half: {x.lo, x.lo} / {x.hi, x.hi}.
__device__ inline uint32_t dup_lo(uint32_t x) { return (x & 0xFFFFu) | (x << 16); }
__device__ inline uint32_t dup_hi(uint32_t x) { return (x >> 16) | (x & 0xFFFF0000u); }

}  // namespace ptx
}  // namespace tinyinfer
