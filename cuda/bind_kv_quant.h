// bind_kv_quant.h -- argument checks and launch of the K/V write into a quantized cache (cuda/kv_quant.cu),
// and the scale arguments of paged_attention over one (cuda/bind_attention.h). Included once, by
// cuda/bindings.cpp. Formats: tinyinfer/ops/kv_quant.py (int8 / fp8 e4m3 bytes, float16 scales).
#pragma once

#include "fused.cuh"
#include "kv_quant.cuh"

namespace tinyinfer {
cudaError_t launch_store_kv_quant(const StoreKVQuantParams& p, FusedDtype dtype, cudaStream_t stream);
}  // namespace tinyinfer

namespace {

int kv_quant_kind(const Tensor& cache) {
  if (cache.scalar_type() == torch::kInt8) return tinyinfer::kKVInt8;
  if (cache.scalar_type() == torch::kFloat8_e4m3fn) return tinyinfer::kKVFp8;
  return tinyinfer::kKVNone;
}

// A quantized cache's scales: float16 on the cache's device, (NB, BS, H); their strides as (block, offset,
// head) in elements.
tinyinfer::CacheStrides check_kv_scale(const Tensor& scale, const Tensor& cache, const char* op, const char* name) {
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && scale.device() == cache.device(), op, ": ", name,
              " must be float16 on ", cache.device(), ", got ", scale.scalar_type(), " on ", scale.device());
  const bool shape_ok = scale.dim() == 3 && scale.size(0) == cache.size(0) && scale.size(1) == cache.size(1) &&
                        scale.size(2) == cache.size(2);
  TORCH_CHECK(shape_ok, op, ": ", name, " has shape ", scale.sizes(), "; a ", cache.scalar_type(), " cache ",
              cache.sizes(), " takes (blocks, block_size, kv heads) scales");
  return {scale.stride(0), scale.stride(1), scale.stride(2)};
}

// k (T, H, D), v (T, H, Dv) | None in the model dtype -> quantized rows of k_cache / v_cache at slot_mapping.
void store_kv_quant(const Tensor& k_in, const std::optional<Tensor>& v_in, const Tensor& k_cache,
                    const std::optional<Tensor>& v_cache, const Tensor& slot_mapping, const Tensor& k_scale,
                    const std::optional<Tensor>& v_scale) {
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_cuda(),
              "store_kv: slot_mapping must be a 1-D int64 CUDA tensor");
  TORCH_CHECK(v_in.has_value() == v_cache.has_value() && v_cache.has_value() == v_scale.has_value(),
              "store_kv: pass v, v_cache and v_scale together, or none of them (MLA)");
  const int kind = kv_quant_kind(k_cache);
  TORCH_CHECK(kind != tinyinfer::kKVNone, "store_kv_quant: k_cache must be int8 or float8_e4m3fn, got ",
              k_cache.scalar_type());
  const int64_t T = k_in.size(0);
  tinyinfer::StoreKVQuantParams p{};
  const Tensor* srcs[2] = {&k_in, v_in ? &*v_in : nullptr};
  const Tensor* caches[2] = {&k_cache, v_cache ? &*v_cache : nullptr};
  const Tensor* scales[2] = {&k_scale, v_scale ? &*v_scale : nullptr};
  Tensor kept[2];
  for (int i = 0; i < 2; ++i) {
    if (srcs[i] == nullptr) continue;
    const Tensor& c = *caches[i];
    TORCH_CHECK(srcs[i]->dim() == 3 && c.dim() == 4 && srcs[i]->size(0) == T && srcs[i]->size(1) == c.size(2) &&
                    srcs[i]->size(2) == c.size(3) && c.scalar_type() == k_cache.scalar_type() && c.stride(3) == 1 &&
                    srcs[i]->is_cuda() && c.device() == k_in.device(),
                "store_kv: rows ", srcs[i]->sizes(), " do not fit the cache ", c.sizes(), " ", c.scalar_type());
    kept[i] = srcs[i]->stride(2) == 1 ? *srcs[i] : srcs[i]->contiguous();
    p.src[i] = kept[i].data_ptr();
    p.src_token_stride[i] = kept[i].stride(0);
    p.src_head_stride[i] = kept[i].stride(1);
    p.cache[i] = static_cast<uint8_t*>(c.data_ptr());
    p.cache_strides[i] = {c.stride(0), c.stride(1), c.stride(2)};
    const tinyinfer::CacheStrides ss = check_kv_scale(*scales[i], c, "store_kv", i ? "v_scale" : "k_scale");
    p.scale[i] = scales[i]->data_ptr();
    p.scale_strides[i][0] = ss.block;
    p.scale_strides[i][1] = ss.offset;
    p.scale_strides[i][2] = ss.head;
    p.width[i] = c.size(3);
  }
  TORCH_CHECK(!v_in || v_in->scalar_type() == k_in.scalar_type(), "store_kv: k and v must share a dtype");
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(k_in.device());
  const Tensor slots = slot_mapping.contiguous();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.num_tokens = T;
  p.num_heads = k_cache.size(2);
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  p.kind = kind;
  check_launch(tinyinfer::launch_store_kv_quant(p, fused_dtype(k_in, "store_kv", "k"), c10::cuda::getCurrentCUDAStream()),
               "store_kv_quant");
}

}  // namespace
