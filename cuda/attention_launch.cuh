// attention_launch.cuh -- host launcher of one configuration of the tensor-core paged-attention kernel
// (cuda/paged_attention.cuh): shared-memory opt-in and occupancy once per device, the split kernel over
// grid (P, Hkv * head_chunks, B [+ 1 padding slice when P = 1]), then the merge kernel when P > 1.
// Shared by cuda/paged_attention.cu (the shipped configurations, cuda/tuned.cuh) and the tuning library
// (cuda/tune/, `make gpu-tune`). CUDA runtime only, no torch.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "paged_attention.cuh"

namespace tinyinfer {

// CTAs per SM of this configuration (planned for the larger, non-aliased shared memory), after raising
// the kernel's dynamic shared-memory limit; both once per device.
template <typename T, int D, int DV, int MT, class C>
cudaError_t paged_attention_occupancy(int* ctas_per_sm) {
  static std::atomic<uint64_t> configured{0};
  static std::atomic<int> occupancy{1};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (!(configured.load() & bit)) {
    const auto kernel = paged_attention_kernel<T, D, DV, MT, C>;
    const int bytes = attn_smem_plan(D, DV, C::TK, C::STAGES, 16 * MT, sizeof(T), false).total_bytes;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    int occ = 0;
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, C::kThreads, bytes);
    if (err != cudaSuccess) return err;
    occupancy.store(occ > 0 ? occ : 1);
    configured.fetch_or(bit);
  }
  *ctas_per_sm = occupancy.load();
  return cudaSuccess;
}

template <typename T, int D, int DV, int MT, class C>
cudaError_t launch_paged_attention_config(const PagedAttentionArgs& a, const PagedAttentionPlan& plan,
                                          cudaStream_t stream) {
  int per_sm = 0;
  cudaError_t err = paged_attention_occupancy<T, D, DV, MT, C>(&per_sm);  // also raises the smem limit
  if (err != cudaSuccess) return err;
  const int bytes = attn_smem_plan(D, DV, C::TK, C::STAGES, 16 * MT, sizeof(T), a.v_aliases_k).total_bytes;
  const bool single = plan.num_splits == 1;
  const dim3 grid(plan.num_splits, a.num_kv_heads * plan.head_chunks, a.num_seqs + (single ? 1 : 0));
  paged_attention_kernel<T, D, DV, MT, C><<<grid, C::kThreads, bytes, stream>>>(a, plan);
  err = cudaGetLastError();
  if (err != cudaSuccess || single) return err;
  paged_attention_merge_kernel<T, DV><<<dim3(a.num_tokens, a.num_q_heads), 128, 0, stream>>>(a, plan, C::TK);
  return cudaGetLastError();
}

}  // namespace tinyinfer
