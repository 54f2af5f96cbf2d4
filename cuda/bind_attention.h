// bind_attention.h -- argument checks and launch of paged_attention (cuda/paged_attention.cu).
// Included once, by cuda/bindings.cpp (the only translation unit with torch headers).
#pragma once

#include "attention.cuh"

namespace tinyinfer {
cudaError_t paged_attention_make_plan(const PagedAttentionArgs& shapes, PagedAttentionPlan* plan);
cudaError_t paged_attention_launch(const PagedAttentionArgs& args, const PagedAttentionPlan& plan,
                                   cudaStream_t stream);
}  // namespace tinyinfer

namespace {

// A cache the kernel can stream with 16-byte copies: unit last stride, rows and strides 16-byte aligned.
void check_attention_cache(const Tensor& cache, const Tensor& q, const char* name) {
  TORCH_CHECK(cache.dim() == 4, "paged_attention: ", name, " must be (num_blocks, block_size, n_kv_heads, "
              "head_dim), got shape ", cache.sizes());
  TORCH_CHECK(cache.device() == q.device(), "paged_attention: ", name, " is on ", cache.device(),
              " but q is on ", q.device());
  TORCH_CHECK(cache.scalar_type() == q.scalar_type() || kv_quant_kind(cache) != tinyinfer::kKVNone,
              "paged_attention: ", name, " is ", cache.scalar_type(), " but q is ", q.scalar_type(),
              "; the kernel reads cache and queries in one dtype, or an int8 / fp8 cache with its scales");
  const int64_t elem = cache.element_size(), need = kv_quant_kind(cache) != tinyinfer::kKVNone ? 8 : 16;
  bool aligned = cache.stride(3) == 1 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % need == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && cache.stride(d) >= 0 && cache.stride(d) * elem % need == 0;
  TORCH_CHECK(aligned, "paged_attention: ", name, " must have a unit-stride last dimension and 16-byte "
              "aligned rows (strides in bytes multiples of 16), got strides ", cache.strides(),
              " and address ", cache.data_ptr(), "; allocate the cache with torch.empty/zeros");
}

Tensor paged_attention(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& block_tables_in, const Tensor& seq_lens_in,
                       const Tensor& query_start_loc_in, double scale,
                       const std::optional<Tensor>& k_scale = std::nullopt,
                       const std::optional<Tensor>& v_scale = std::nullopt) {
  TORCH_CHECK(q_in.is_cuda(), "paged_attention: q must be a CUDA tensor, got one on ", q_in.device());
  TORCH_CHECK(q_in.dim() == 3, "paged_attention: q must be (T, n_heads, head_dim), got shape ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat16 || q_in.scalar_type() == torch::kBFloat16,
              "paged_attention: the CUDA kernel supports float16 and bfloat16, got ", q_in.scalar_type(),
              "; run the model in fp16/bf16 or call tinyinfer.ops.reference.paged_attention");
  check_attention_cache(k_cache, q_in, "k_cache");
  check_attention_cache(v_cache, q_in, "v_cache");
  const int64_t T = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t Hkv = k_cache.size(2), BS = k_cache.size(1), Dv = v_cache.size(3);
  TORCH_CHECK(k_cache.size(3) == D, "paged_attention: k_cache head_dim ", k_cache.size(3), " != q head_dim ", D);
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == BS && v_cache.size(2) == Hkv,
              "paged_attention: v_cache ", v_cache.sizes(), " and k_cache ", k_cache.sizes(),
              " must agree on num_blocks, block_size and n_kv_heads");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_attention: n_heads ", Hq, " is not a multiple of n_kv_heads ",
              Hkv);
  TORCH_CHECK(tinyinfer::paged_attention_supports(static_cast<int>(D), static_cast<int>(Dv)),
              "paged_attention: head dims (K ", D, ", V ", Dv, ") have no CUDA kernel; supported: 64/64, "
              "128/128 and MLA 576/512. Call tinyinfer.ops.reference.paged_attention for other shapes");
  TORCH_CHECK(tinyinfer::paged_attention_supports_block_size(static_cast<int>(BS)), "paged_attention: the CUDA "
              "kernel needs a power-of-two block size (8, 16, 32, ...), got ", BS,
              "; allocate the KV cache with such a block size or call tinyinfer.ops.reference.paged_attention");
  TORCH_CHECK(block_tables_in.dim() == 2 && block_tables_in.scalar_type() == torch::kInt32,
              "paged_attention: block_tables must be int32 (B, max_blocks), got ", block_tables_in.scalar_type(),
              " ", block_tables_in.sizes());
  const int64_t B = block_tables_in.size(0), MB = block_tables_in.size(1);
  TORCH_CHECK(seq_lens_in.dim() == 1 && seq_lens_in.size(0) == B && seq_lens_in.scalar_type() == torch::kInt32,
              "paged_attention: seq_lens must be int32 (B=", B, ",), got ", seq_lens_in.scalar_type(), " ",
              seq_lens_in.sizes());
  TORCH_CHECK(query_start_loc_in.dim() == 1 && query_start_loc_in.size(0) == B + 1 &&
              query_start_loc_in.scalar_type() == torch::kInt32,
              "paged_attention: query_start_loc must be int32 (B+1=", B + 1, ",), got ",
              query_start_loc_in.scalar_type(), " ", query_start_loc_in.sizes());
  for (const Tensor* t : {&block_tables_in, &seq_lens_in, &query_start_loc_in}) {
    TORCH_CHECK(t->device() == q_in.device(), "paged_attention: block_tables, seq_lens and query_start_loc "
                "must be on q's device ", q_in.device(), ", got ", t->device());
  }
  TORCH_CHECK(B < 65535 && T < (int64_t(1) << 31) && MB * BS < (int64_t(1) << 31),
              "paged_attention: shape too large for the launch grid: B=", B, " (max 65534), T=", T,
              ", max_blocks*block_size=", MB * BS);
  Tensor out = torch::empty({T, Hq, Dv}, q_in.options());
  if (T == 0) return out;

  const c10::cuda::CUDAGuard guard(q_in.device());
  // The kernel reads q rows with 16-byte loads: unit last stride, 16-byte aligned rows and heads.
  const int64_t qe = q_in.element_size();
  const bool q_ok = q_in.stride(2) == 1 && q_in.stride(0) * qe % 16 == 0 && q_in.stride(1) * qe % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0;
  const Tensor q = q_ok ? q_in : q_in.contiguous();
  const Tensor block_tables = block_tables_in.stride(1) == 1 ? block_tables_in : block_tables_in.contiguous();
  const Tensor seq_lens = seq_lens_in.contiguous(), query_start_loc = query_start_loc_in.contiguous();
  tinyinfer::PagedAttentionArgs a{};
  a.q = q.data_ptr();
  a.q_s0 = q.stride(0);
  a.q_s1 = q.stride(1);
  a.k = k_cache.data_ptr();
  a.k_s0 = k_cache.stride(0);
  a.k_s1 = k_cache.stride(1);
  a.k_s2 = k_cache.stride(2);
  a.v = v_cache.data_ptr();
  a.v_s0 = v_cache.stride(0);
  a.v_s1 = v_cache.stride(1);
  a.v_s2 = v_cache.stride(2);
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.bt_stride = block_tables.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.num_tokens = static_cast<int>(T);
  a.num_seqs = static_cast<int>(B);
  a.max_blocks = static_cast<int>(MB);
  a.num_q_heads = static_cast<int>(Hq);
  a.num_kv_heads = static_cast<int>(Hkv);
  a.head_dim = static_cast<int>(D);
  a.head_dim_v = static_cast<int>(Dv);
  a.block_size = static_cast<int>(BS);
  a.block_shift = tinyinfer::log2_if_power_of_two(static_cast<int>(BS));
  a.scale = static_cast<float>(scale);
  a.dtype = q.scalar_type() == torch::kFloat16 ? tinyinfer::PagedAttentionDtype::kHalf
                                               : tinyinfer::PagedAttentionDtype::kBFloat16;
  a.kv_quant = kv_quant_kind(k_cache);   // int8 / fp8: rows dequantized as the tiles load (kv_quant.cuh)
  if (a.kv_quant != tinyinfer::kKVNone) {
    TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && k_scale && v_scale, "paged_attention: a ",
                k_cache.scalar_type(), " cache needs a v_cache of its dtype, k_scale and v_scale");
    const tinyinfer::CacheStrides kss = check_kv_scale(*k_scale, k_cache, "paged_attention", "k_scale");
    const tinyinfer::CacheStrides vss = check_kv_scale(*v_scale, v_cache, "paged_attention", "v_scale");
    a.k_scale = k_scale->data_ptr();
    a.ks0 = kss.block, a.ks1 = kss.offset, a.ks2 = kss.head;
    a.v_scale = v_scale->data_ptr();
    a.vs0 = vss.block, a.vs1 = vss.offset, a.vs2 = vss.head;
  }
  // MLA passes v_cache = k_cache[..., :Dv]: same rows, so the kernel loads each latent row once.
  a.v_aliases_k = v_cache.data_ptr() == k_cache.data_ptr() && v_cache.stride(0) == k_cache.stride(0) &&
                  v_cache.stride(1) == k_cache.stride(1) && v_cache.stride(2) == k_cache.stride(2) && Dv <= D;
  // The plan depends on shapes and the device only (CUDA-graph safe); with more than one partition per
  // sequence the partial results go through a workspace sized from it.
  tinyinfer::PagedAttentionPlan plan{};
  check_launch(tinyinfer::paged_attention_make_plan(a, &plan), "paged_attention (plan)");
  Tensor ws;
  if (plan.workspace_floats > 0) {
    ws = torch::empty({plan.workspace_floats}, q.options().dtype(torch::kFloat32));
    const int64_t partials = T * Hq * plan.num_splits;
    a.ws_out = ws.data_ptr<float>();
    a.ws_max = a.ws_out + partials * Dv;
    a.ws_sum = a.ws_max + partials;
  }
  check_launch(tinyinfer::paged_attention_launch(a, plan, c10::cuda::getCurrentCUDAStream()), "paged_attention");
  return out;
}

}  // namespace
