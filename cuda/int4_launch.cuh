// int4_launch.cuh -- host launcher of one configuration of the INT4 M <= 64 kernel (cuda/int4_mm.cuh),
// shared by cuda/int4_linear.cu (the shipped configurations, cuda/tuned.cuh) and the tuning library
// (cuda/tune/, built by `make gpu-tune`). CUDA runtime only, no torch.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "int4_mm.cuh"

namespace tinyinfer {

// One configuration's launch (also the tuning library's entry point): the shared-memory opt-in and the
// occupancy query once per device, split-K from shapes and occupancy (int4_choose_split) unless
// `split` > 0 forces it, then PDL + cluster attributes, retried without PDL and then without clusters
// where a driver refuses them.
template <typename T, Int4Zeros Z, int G, int MS, class C>
cudaError_t launch_int4_mm(const Int4LinearParams& p, int split, float fill, cudaStream_t stream) {
  constexpr Int4SmemPlan plan = int4_smem_plan<C, MS, G, Z == Int4Zeros::kUint8 ? 1 : 2>();
  const auto kernel = int4_mm_kernel<T, Z, G, MS, C>;
  static std::atomic<uint64_t> configured{0};
  static std::atomic<int> occupancy{1};
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (!(configured.load() & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.total_bytes);
    int occ = 0;
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, C::kThreads, plan.total_bytes);
    if (err != cudaSuccess) return err;
    occupancy.store(occ > 0 ? occ : 1);
    configured.fetch_or(bit);
  }
  Int4MmArgs a = int4_mm_args<C, G>(p, 1);
  const int ctas_n = int4_mm_ctas_n<C>(a);
  if (split <= 0) split = int4_choose_split(ctas_n, a.stages, sms * occupancy.load(), fill);
  split = split < a.stages ? split : a.stages;
  auto launch = [&](bool pdl, int sp) {
    a.split = sp;
    cudaLaunchAttribute at[2];
    int n = 0;
    if (pdl) {
      at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      at[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (sp > 1) {
      at[n].id = cudaLaunchAttributeClusterDimension;
      at[n].val.clusterDim.x = 1;
      at[n].val.clusterDim.y = sp;
      at[n++].val.clusterDim.z = 1;
    }
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(ctas_n, sp);
    cfg.blockDim = dim3(C::kThreads);
    cfg.dynamicSmemBytes = plan.total_bytes;
    cfg.stream = stream;
    cfg.attrs = at;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, a);
  };
  err = launch(p.pdl, split);
  if (err != cudaSuccess && p.pdl) {  // a driver refusing programmatic dependent launch
    cudaGetLastError();
    err = launch(false, split);
  }
  if (err != cudaSuccess && split > 1) {  // ... or clusters
    cudaGetLastError();
    err = launch(false, 1);
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace tinyinfer
