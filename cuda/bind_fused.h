// bind_fused.h -- argument checks and launches of the fused decode-path ops: rms_norm,
// fused_add_rmsnorm (cuda/fused_norm.cu), rope_store_kv (cuda/rope_store_kv.cu) and silu_and_mul
// (cuda/silu_mul.cu). Included once, by
// cuda/bindings.cpp (the only translation unit with torch headers).
#pragma once

#include "fused.cuh"

namespace tinyinfer {
cudaError_t launch_rms_norm(const RMSNormParams& p, FusedDtype dtype, cudaStream_t stream);
cudaError_t launch_rope_store_kv(const RopeStoreKVParams& p, FusedDtype dtype, cudaStream_t stream);
cudaError_t launch_silu_and_mul(const SiluMulParams& p, FusedDtype dtype, cudaStream_t stream);
}  // namespace tinyinfer

namespace {

tinyinfer::FusedDtype fused_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return tinyinfer::FusedDtype::kFloat32;
    case torch::kFloat16: return tinyinfer::FusedDtype::kFloat16;
    case torch::kBFloat16: return tinyinfer::FusedDtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type(),
                  "; load the model in one of those dtypes");
  }
  return tinyinfer::FusedDtype::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

void check_same_dtype_device(const Tensor& t, const Tensor& like, const char* op, const char* name,
                             const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ",
              like_name, " is ", like.scalar_type(), "; the kernel runs in one dtype, so convert ", name);
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device(), "; move both to the same CUDA device");
}

// (rows, hidden) view of a (..., hidden) input with unit-stride rows (a copy only when needed).
Tensor as_rows(const Tensor& t) {
  Tensor rows = t.reshape({-1, t.size(-1)});
  return rows.stride(1) == 1 && rows.stride(0) >= 0 ? rows : rows.contiguous();
}

// Shared by both norm ops: y = rms_norm(x (+ residual)) * weight; returns (y, x + residual or undefined).
std::tuple<Tensor, Tensor> run_rms_norm(const char* op, const Tensor& x, const Tensor* residual,
                                        const Tensor& weight, double eps) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must be (..., hidden) with hidden > 0, got shape ",
              x.sizes());
  const int64_t hidden = x.size(-1);
  const tinyinfer::FusedDtype dtype = fused_dtype(x, op, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, op, ": weight must be (hidden,) = (", hidden,
              ",), got shape ", weight.sizes());
  check_same_dtype_device(weight, x, op, "weight", "x");
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    check_same_dtype_device(*residual, x, op, "residual", "x");
  }
  const Tensor xr = as_rows(x);
  const int64_t T = xr.size(0);
  TORCH_CHECK(T < (int64_t(1) << 31), op, ": ", T, " rows in one call; split the batch below 2^31 rows");
  Tensor y = torch::empty(x.sizes(), x.options());
  Tensor new_residual = residual != nullptr ? torch::empty(x.sizes(), x.options()) : Tensor();
  if (T == 0) return {y, new_residual};

  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor w = weight.contiguous();
  const Tensor rr = residual != nullptr ? as_rows(*residual) : Tensor();
  tinyinfer::RMSNormParams p{};
  p.x = xr.data_ptr();
  p.x_stride = xr.stride(0);
  p.weight = w.data_ptr();
  p.out = y.data_ptr();
  p.num_tokens = T;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  if (residual != nullptr) {
    p.residual = rr.data_ptr();
    p.residual_stride = rr.stride(0);
    p.residual_out = new_residual.data_ptr();
  }
  check_launch(tinyinfer::launch_rms_norm(p, dtype, c10::cuda::getCurrentCUDAStream()), op);
  return {y, new_residual};
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return std::get<0>(run_rms_norm("rms_norm", x, nullptr, weight, eps));
}

std::tuple<Tensor, Tensor> fused_add_rmsnorm(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                             double eps) {
  return run_rms_norm("fused_add_rmsnorm", x, &residual, weight, eps);
}

// A (T, heads, dim) input the rope kernel can read: unit-stride last dimension, non-negative strides.
Tensor rope_input(const Tensor& t, int64_t T, const Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == T, "rope_store_kv: ", name, " must be (T=", T,
              ", heads, head_dim), got shape ", t.sizes());
  check_same_dtype_device(t, q, "rope_store_kv", name, "q");
  return t.stride(2) == 1 && t.stride(0) >= 0 && t.stride(1) >= 0 ? t : t.contiguous();
}

void check_rope_cache(const Tensor& cache, const Tensor& q, const Tensor& src, const char* name,
                      const char* src_name) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(2) == src.size(1) && cache.size(3) == src.size(2),
              "rope_store_kv: ", name, " must be (num_blocks, block_size, ", src.size(1), ", ", src.size(2),
              ") to hold ", src_name, " rows, got shape ", cache.sizes());
  check_same_dtype_device(cache, q, "rope_store_kv", name, "q");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(0) >= 0 && cache.stride(1) >= 0 && cache.stride(2) >= 0,
              "rope_store_kv: ", name, " must have a unit-stride last dimension and non-negative strides, got "
              "strides ", cache.strides(), "; the cache is written in place, so allocate it with that layout");
}

// A (T,) int64 per-token index tensor on q's device (positions, slot_mapping).
Tensor token_index(const Tensor& t, int64_t T, const Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == T && t.scalar_type() == torch::kInt64, "rope_store_kv: ", name,
              " must be int64 of shape (", T, ",), got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "rope_store_kv: ", name, " is on ", t.device(), " but q is on ", q.device());
  return t.contiguous();
}

// RoPE from the model's cos/sin table gathered at each token's position, + the K/V cache write.
std::tuple<Tensor, Tensor> rope_store_kv(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos_sin_cache,
                                         const Tensor& positions, const Tensor& k_cache, const Tensor& v_cache,
                                         const Tensor& slot_mapping) {
  TORCH_CHECK(q.is_cuda(), "rope_store_kv: q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.dim() == 3, "rope_store_kv: q must be (T, n_heads, head_dim), got shape ", q.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const tinyinfer::FusedDtype dtype = fused_dtype(q, "rope_store_kv", "q");
  TORCH_CHECK(D > 0 && D % 2 == 0, "rope_store_kv: head_dim must be even (rotate_half pairs dim i with "
              "i + D/2), got ", D);
  const Tensor qq = rope_input(q, T, q, "q"), kk = rope_input(k, T, q, "k"), vv = rope_input(v, T, q, "v");
  TORCH_CHECK(k.size(2) == D, "rope_store_kv: k has head_dim ", k.size(2), " but q has ", D);
  TORCH_CHECK(v.size(1) == k.size(1), "rope_store_kv: v has ", v.size(1), " heads but k has ", k.size(1));
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == D && cos_sin_cache.size(0) > 0,
              "rope_store_kv: cos_sin_cache must be (max_positions, head_dim=", D, ") with rows [cos | sin], got "
              "shape ", cos_sin_cache.sizes());
  check_same_dtype_device(cos_sin_cache, q, "rope_store_kv", "cos_sin_cache", "q");
  const Tensor table = cos_sin_cache.stride(1) == 1 && cos_sin_cache.stride(0) >= 0 ? cos_sin_cache
                                                                                   : cos_sin_cache.contiguous();
  check_rope_cache(k_cache, q, k, "k_cache", "k");
  check_rope_cache(v_cache, q, v, "v_cache", "v");
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1),
              "rope_store_kv: v_cache ", v_cache.sizes(), " and k_cache ", k_cache.sizes(),
              " must agree on num_blocks and block_size");
  const Tensor slots = token_index(slot_mapping, T, q, "slot_mapping");
  const Tensor pos = token_index(positions, T, q, "positions");
  TORCH_CHECK(T < (int64_t(1) << 31), "rope_store_kv: ", T, " tokens in one call; split the batch below 2^31");
  const int64_t units = (Hq + k.size(1)) * (D / 2) + k.size(1) * v.size(2);  // per token, 1 value per unit
  TORCH_CHECK(units <= int64_t(65535) * 128, "rope_store_kv: ", units, " values per token exceed the launch "
              "grid (at most 65535 * 128); this head count / head_dim is not supported");
  Tensor q_out = torch::empty({T, Hq, D}, q.options());
  Tensor k_out = torch::empty({T, k.size(1), D}, q.options());
  if (T == 0) return {q_out, k_out};

  const c10::cuda::CUDAGuard guard(q.device());
  tinyinfer::RopeStoreKVParams p{};
  p.q = qq.data_ptr();
  p.k = kk.data_ptr();
  p.v = vv.data_ptr();
  p.cos_sin = table.data_ptr();
  p.positions = pos.data_ptr<int64_t>();
  p.num_positions = table.size(0);
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.num_tokens = T;
  p.num_q_heads = Hq;
  p.num_kv_heads = k.size(1);
  p.head_dim = D;
  p.head_dim_v = v.size(2);
  p.num_blocks = k_cache.size(0);
  p.block_size = k_cache.size(1);
  p.q_token_stride = qq.stride(0);
  p.q_head_stride = qq.stride(1);
  p.k_token_stride = kk.stride(0);
  p.k_head_stride = kk.stride(1);
  p.v_token_stride = vv.stride(0);
  p.v_head_stride = vv.stride(1);
  p.cos_sin_stride = table.stride(0);
  p.k_cache_strides = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  p.v_cache_strides = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  check_launch(tinyinfer::launch_rope_store_kv(p, dtype, c10::cuda::getCurrentCUDAStream()), "rope_store_kv");
  return {q_out, k_out};
}

// SwiGLU's activation: y = silu(x[..., :F]) * x[..., F:] for x (..., 2F) -> y (..., F).
Tensor silu_and_mul(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "silu_and_mul: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % 2 == 0, "silu_and_mul: x must be "
              "(..., 2 * intermediate) = [gate | up] with an even last dimension, got shape ", x.sizes());
  const tinyinfer::FusedDtype dtype = fused_dtype(x, "silu_and_mul", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xr = as_rows(x);
  const int64_t F = x.size(-1) / 2, T = xr.size(0);
  TORCH_CHECK(T < (int64_t(1) << 31), "silu_and_mul: ", T, " rows in one call; split the batch below 2^31");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  Tensor y = torch::empty(shape, x.options());
  tinyinfer::SiluMulParams p{};
  p.x = xr.data_ptr();
  p.y = y.data_ptr();
  p.num_tokens = T;
  p.width = F;
  p.x_row_stride = xr.stride(0);
  check_launch(tinyinfer::launch_silu_and_mul(p, dtype, c10::cuda::getCurrentCUDAStream()), "silu_and_mul");
  return y;
}

}  // namespace
