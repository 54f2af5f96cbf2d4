// attention_variant.cu -- one configuration of the paged-attention kernel (cuda/paged_attention.cuh) as a
// C entry point, for the tuning library `make gpu-tune` builds (tools/gpu_tune.py compiles this file
// once per variant with -D TI_NAME=... -D TI_MT=... -D TI_W=... -D TI_TK=... -D TI_STAGES=...).
// bf16, head dim 128, contiguous caches (NB, BS, Hkv, 128); the plan as paged_attention_make_plan makes
// it, with the split fill and minimum partition given. Returns a cudaError_t, or -1 when `ws_floats`
// is too small for the plan's workspace; *num_splits receives the plan's partition count.
#include <cuda_runtime.h>

#include "../attention_launch.cuh"

extern "C" int TI_NAME(const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,
                       const int32_t* seq_lens, const int32_t* query_start_loc, void* out, float* ws,
                       long long ws_floats, int T, int B, int MB, int Hq, int Hkv, int BS, float scale,
                       float fill, int min_chunk, cudaStream_t stream, int* num_splits) {
  using namespace tinyinfer;
  constexpr int D = 128;
  PagedAttentionArgs a{};
  a.q = q; a.q_s0 = int64_t(Hq) * D; a.q_s1 = D;
  a.k = k_cache; a.k_s0 = int64_t(BS) * Hkv * D; a.k_s1 = int64_t(Hkv) * D; a.k_s2 = D;
  a.v = v_cache; a.v_s0 = a.k_s0; a.v_s1 = a.k_s1; a.v_s2 = a.k_s2;
  a.block_tables = block_tables; a.bt_stride = MB; a.seq_lens = seq_lens; a.query_start_loc = query_start_loc;
  a.out = out;
  a.num_tokens = T; a.num_seqs = B; a.max_blocks = MB; a.num_q_heads = Hq; a.num_kv_heads = Hkv;
  a.head_dim = D; a.head_dim_v = D; a.block_size = BS; a.block_shift = log2_if_power_of_two(BS);
  a.scale = scale; a.dtype = PagedAttentionDtype::kBFloat16; a.v_aliases_k = false;
  using C = AttnTile<TI_W, TI_TK, TI_STAGES>;
  PagedAttentionPlan plan = attn_plan_shapes(a, min_chunk);
  plan.m_tiles = TI_MT;
  int per_sm = 1, device = 0, sms = 1;
  cudaError_t err = paged_attention_occupancy<__nv_bfloat16, D, D, TI_MT, C>(&per_sm);
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return static_cast<int>(err);
  attn_plan_splits(a, sms * per_sm, fill, &plan);
  *num_splits = plan.num_splits;
  if (plan.workspace_floats > ws_floats) return -1;
  const int64_t partials = int64_t(T) * Hq * plan.num_splits;
  a.ws_out = ws; a.ws_max = ws + partials * D; a.ws_sum = a.ws_max + partials;
  return static_cast<int>(launch_paged_attention_config<__nv_bfloat16, D, D, TI_MT, C>(a, plan, stream));
}
