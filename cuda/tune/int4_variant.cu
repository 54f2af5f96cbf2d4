// int4_variant.cu -- one tile configuration of the INT4 kernel (cuda/int4_mm.cuh) as a C entry point, for
// the tuning library `make gpu-tune` builds (tools/gpu_tune.py compiles this file once per variant with
// -D TI_NAME=... -D TI_MS=... -D TI_WN=... -D TI_WK=... -D TI_R=... -D TI_KPS=... -D TI_STAGES=...).
// Activations bf16, scales fp16, integer zeros, G = 128: how an INT4 Llama checkpoint runs.
#include <cuda_runtime.h>

#include "../int4_launch.cuh"

extern "C" int TI_NAME(const void* x, const void* qweight, const void* scales, const void* zeros, void* y,
                       int M, int N, int K, int split, float fill, cudaStream_t stream) {
  using namespace tinyinfer;
  Int4LinearParams p{};
  p.x = x; p.qweight = qweight; p.scales = scales; p.zeros = zeros; p.y = y;
  p.M = M; p.N = N; p.K = K; p.group_size = 128;
  p.x_bf16 = true; p.scales_bf16 = false; p.zero_kind = Int4Zeros::kUint8; p.pdl = true;
  using C = Int4Tile<TI_WN, TI_WK, TI_R, TI_KPS, TI_STAGES>;
  return static_cast<int>(launch_int4_mm<__nv_bfloat16, Int4Zeros::kUint8, 128, TI_MS, C>(p, split, fill, stream));
}
