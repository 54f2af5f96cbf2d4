// kv_quant.cu -- the K/V write into a quantized paged cache (int8 / fp8 e4m3 bytes and float16 scales;
// the row arithmetic is cuda/kv_quant.cuh, the contract ops.store_kv's: tinyinfer/ops/reference.py).
//
// Launch: one thread per (token, K or V, KV head) row, 128 threads a block. A row is at most 576 values
// and a step writes T x 2 x Hkv of them, so the write is a small part of a decode step; int8's amax is
// a loop over the row in its own thread (no cross-thread reduction). The grid depends on T and Hkv only,
// so a captured CUDA graph replays it for new slots.
#include <cuda_runtime.h>

#include "fused.cuh"
#include "kv_quant.cuh"

namespace tinyinfer {

template <typename T>
__global__ void __launch_bounds__(128) store_kv_quant_kernel(const StoreKVQuantParams p) {
  store_kv_quant_row<T>(p, static_cast<int64_t>(blockIdx.x) * 128 + threadIdx.x);
}

// Host launcher: T > 0; strides in elements (the cache's are bytes: one-byte elements).
cudaError_t launch_store_kv_quant(const StoreKVQuantParams& p, FusedDtype dtype, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(ceil_div(p.num_tokens * 2 * p.num_heads, 128));
  return launch_for_dtype(dtype, [&](auto t) {
    store_kv_quant_kernel<decltype(t)><<<blocks, 128, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace tinyinfer
