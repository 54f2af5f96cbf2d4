// bind_store_kv.h -- argument checks and launch of store_kv (cuda/store_kv.cu). Included once, by
// cuda/bindings.cpp (the only translation unit with torch headers).
#pragma once

#include "store_kv.cuh"

namespace tinyinfer {
cudaError_t launch_store_kv(const StoreKVParams& bytes, cudaStream_t stream);
}  // namespace tinyinfer

namespace {

void check_float_dtype(const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == torch::kFloat16 || dt == torch::kBFloat16 || dt == torch::kFloat32, "store_kv: ", name,
              " must be float16, bfloat16 or float32, got ", dt, "; convert the cache/model dtype");
}


// Checks one (source, cache) pair and returns the source in a form the kernel can read: the
// cache's dtype, unit-stride last dimension.
Tensor check_kv_pair(const Tensor& src, const Tensor& cache, const Tensor& slot_mapping, const char* src_name,
                     const char* cache_name) {
  TORCH_CHECK(src.dim() == 3, "store_kv: ", src_name, " must be (T, n_kv_heads, head_dim), got shape ",
              src.sizes());
  TORCH_CHECK(cache.dim() == 4, "store_kv: ", cache_name,
              " must be (num_blocks, block_size, n_kv_heads, head_dim), got shape ", cache.sizes());
  TORCH_CHECK(src.is_cuda() && cache.device() == src.device() && slot_mapping.device() == src.device(),
              "store_kv: ", src_name, ", ", cache_name, " and slot_mapping must be on the same CUDA device, got ",
              src.device(), ", ", cache.device(), ", ", slot_mapping.device());
  TORCH_CHECK(src.size(0) == slot_mapping.size(0), "store_kv: ", src_name, " has ", src.size(0),
              " tokens but slot_mapping has ", slot_mapping.size(0), "; pass one slot per token");
  TORCH_CHECK(src.size(1) == cache.size(2) && src.size(2) == cache.size(3), "store_kv: ", src_name,
              " rows of shape (", src.size(1), ", ", src.size(2), ") do not fit ", cache_name,
              " rows of shape (", cache.size(2), ", ", cache.size(3), ")");
  TORCH_CHECK(src.size(2) > 0, "store_kv: ", src_name, " has head_dim 0");
  check_float_dtype(cache, cache_name);
  TORCH_CHECK(cache.stride(3) == 1, "store_kv: ", cache_name, " must have a unit-stride last dimension, got "
              "strides ", cache.strides(), "; the cache is written in place, so allocate it with that layout");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(cache.stride(d) >= 0, "store_kv: ", cache_name, " has a negative stride: ", cache.strides());
  }
  Tensor out = src.scalar_type() == cache.scalar_type() ? src : src.to(cache.scalar_type());
  if (out.stride(2) != 1 || out.stride(0) < 0 || out.stride(1) < 0) out = out.contiguous();
  return out;
}

void store_kv(const Tensor& k, const std::optional<Tensor>& v, const Tensor& k_cache,
              const std::optional<Tensor>& v_cache, const Tensor& slot_mapping) {
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == torch::kInt64,
              "store_kv: slot_mapping must be a 1-D int64 tensor, got ", slot_mapping.scalar_type(),
              " of shape ", slot_mapping.sizes());
  TORCH_CHECK(v.has_value() == v_cache.has_value(), "store_kv: pass v and v_cache together (MHA/GQA) or "
              "neither (MLA), got v ", v.has_value() ? "set" : "None", " and v_cache ",
              v_cache.has_value() ? "set" : "None");
  const Tensor kk = check_kv_pair(k, k_cache, slot_mapping, "k", "k_cache");
  Tensor vv;
  if (v.has_value()) {
    vv = check_kv_pair(*v, *v_cache, slot_mapping, "v", "v_cache");
    TORCH_CHECK(v->size(1) == k.size(1) && v_cache->size(0) == k_cache.size(0) &&
                v_cache->size(1) == k_cache.size(1), "store_kv: v_cache ", v_cache->sizes(),
                " and k_cache ", k_cache.sizes(), " must agree on blocks, block size and kv heads");
  }
  const int64_t T = k.size(0);
  TORCH_CHECK(T < (int64_t(1) << 31), "store_kv: ", T, " tokens in one call; split the batch below 2^31");
  if (T == 0 || k.size(1) == 0) return;

  const c10::cuda::CUDAGuard guard(k.device());
  const Tensor slots = slot_mapping.contiguous();
  const int64_t es = k_cache.element_size();
  tinyinfer::StoreKVParams p{};  // every length and stride in bytes; the launcher picks the word size
  p.k = kk.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.num_tokens = T;
  p.num_heads = k.size(1);
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  p.k_row_words = k.size(2) * es;
  p.k_token_stride = kk.stride(0) * es;
  p.k_head_stride = kk.stride(1) * es;
  p.k_cache_strides = {k_cache.stride(0) * es, k_cache.stride(1) * es, k_cache.stride(2) * es};
  if (v.has_value()) {
    const int64_t ves = v_cache->element_size();
    TORCH_CHECK(ves == es, "store_kv: k_cache and v_cache must share a dtype, got ", k_cache.scalar_type(),
                " and ", v_cache->scalar_type());
    p.v = vv.data_ptr();
    p.v_cache = v_cache->data_ptr();
    p.v_row_words = v->size(2) * es;
    p.v_token_stride = vv.stride(0) * es;
    p.v_head_stride = vv.stride(1) * es;
    p.v_cache_strides = {v_cache->stride(0) * es, v_cache->stride(1) * es, v_cache->stride(2) * es};
  }
  check_launch(tinyinfer::launch_store_kv(p, c10::cuda::getCurrentCUDAStream()), "store_kv");
}

}  // namespace
