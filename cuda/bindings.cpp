// bindings.cpp -- the only file of the extension that includes torch: it checks the arguments of each
// op, turns tensors into raw pointers, strides and sizes, and calls the plain C++ launchers of the
// cuda/*.cu files on the current CUDA stream. The ops themselves (and their CPU references) live in
// tinyinfer/ops.py; tinyinfer/kernels.py registers these functions as their `cuda` implementations.
//
// To add a kernel family: include its header (or declare its launcher) below, write a binding
// function that checks its arguments, and add one m.def line to the module at the bottom.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/python.h>

#include <optional>

#include "int4.cuh"
#include "store_kv.cuh"
#include "fused.cuh"
#include "attention.cuh"

namespace tinyinfer {
cudaError_t launch_store_kv(const StoreKVParams& bytes, cudaStream_t stream);
cudaError_t launch_rms_norm(const RMSNormParams& p, FusedDtype dtype, cudaStream_t stream);
cudaError_t launch_rope_store_kv(const RopeStoreKVParams& p, FusedDtype dtype, cudaStream_t stream);
cudaError_t launch_int4_gemv(const Int4GemvParams& p, cudaStream_t stream);
cudaError_t launch_int4_dequant(const Int4GemvParams& p, cudaStream_t stream);
cudaError_t paged_attention_launch(const PagedAttentionArgs& args, const PagedAttentionPlan& plan,
                                   cudaStream_t stream);
}  // namespace tinyinfer

namespace {

using torch::Tensor;

// Kernel launches report configuration errors through cudaGetLastError; turn them into exceptions.
void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "tinyinfer: launching the ", kernel,
              " kernel failed: ", cudaGetErrorString(err));
}

void check_float_dtype(const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == torch::kFloat16 || dt == torch::kBFloat16 || dt == torch::kFloat32, "store_kv: ", name,
              " must be float16, bfloat16 or float32, got ", dt, "; convert the cache/model dtype");
}

// ---------------------------------------------------------------------------------------------
// store_kv (cuda/store_kv.cu)
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// rms_norm, fused_add_rmsnorm (cuda/fused_norm.cu) and rope_store_kv (cuda/rope_store_kv.cu)
// ---------------------------------------------------------------------------------------------

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

std::tuple<Tensor, Tensor> rope_store_kv(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos,
                                         const Tensor& sin, const Tensor& k_cache, const Tensor& v_cache,
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
  Tensor tables[2];
  const char* table_names[2] = {"cos", "sin"};
  for (int i = 0; i < 2; ++i) {
    const Tensor& table = i == 0 ? cos : sin;
    TORCH_CHECK(table.dim() == 2 && table.size(0) == T && table.size(1) == D, "rope_store_kv: ", table_names[i],
                " must be (T, head_dim) = (", T, ", ", D, "), got shape ", table.sizes());
    check_same_dtype_device(table, q, "rope_store_kv", table_names[i], "q");
    tables[i] = table.stride(1) == 1 && table.stride(0) >= 0 ? table : table.contiguous();
  }
  check_rope_cache(k_cache, q, k, "k_cache", "k");
  check_rope_cache(v_cache, q, v, "v_cache", "v");
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1),
              "rope_store_kv: v_cache ", v_cache.sizes(), " and k_cache ", k_cache.sizes(),
              " must agree on num_blocks and block_size");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T && slot_mapping.scalar_type() == torch::kInt64,
              "rope_store_kv: slot_mapping must be int64 of shape (", T, ",), got ", slot_mapping.scalar_type(),
              " of shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.device() == q.device(), "rope_store_kv: slot_mapping is on ", slot_mapping.device(),
              " but q is on ", q.device());
  TORCH_CHECK(T < (int64_t(1) << 31), "rope_store_kv: ", T, " tokens in one call; split the batch below 2^31");
  const int64_t units = (Hq + k.size(1)) * (D / 2) + k.size(1) * v.size(2);  // per token, 1 value per unit
  TORCH_CHECK(units <= int64_t(65535) * 128, "rope_store_kv: ", units, " values per token exceed the launch "
              "grid (at most 65535 * 128); this head count / head_dim is not supported");
  Tensor q_out = torch::empty({T, Hq, D}, q.options());
  Tensor k_out = torch::empty({T, k.size(1), D}, q.options());
  if (T == 0) return {q_out, k_out};

  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor slots = slot_mapping.contiguous();
  tinyinfer::RopeStoreKVParams p{};
  p.q = qq.data_ptr();
  p.k = kk.data_ptr();
  p.v = vv.data_ptr();
  p.cos = tables[0].data_ptr();
  p.sin = tables[1].data_ptr();
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
  p.cos_stride = tables[0].stride(0);
  p.sin_stride = tables[1].stride(0);
  p.k_cache_strides = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  p.v_cache_strides = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  check_launch(tinyinfer::launch_rope_store_kv(p, dtype, c10::cuda::getCurrentCUDAStream()), "rope_store_kv");
  return {q_out, k_out};
}


// ---------------------------------------------------------------------------------------------
// int4_linear (cuda/int4_gemv.cu): y = x @ dequant(W).T, layouts in tinyinfer/quant.py
// ---------------------------------------------------------------------------------------------

// Checks the packed weight against x and returns the launcher parameters (y left unset).
tinyinfer::Int4GemvParams int4_params(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                                      const Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat16 || x.scalar_type() == torch::kBFloat16,
              "int4_linear: x must be float16 or bfloat16, got ", x.scalar_type(),
              "; run the INT4 model in fp16 or bf16");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "int4_linear: group_size must be 32, 64 or 128, got ", group_size);
  const int64_t K = x.size(1);
  TORCH_CHECK(K > 0 && K % group_size == 0, "int4_linear: K=", K, " (x.size(1)) is not a multiple of the group "
              "size ", group_size, "; quantize this layer with a group size that divides K");
  const int64_t KB = (K + 63) / 64, NG = KB * 64 / group_size;
  TORCH_CHECK(qweight.dim() == 4 && qweight.scalar_type() == torch::kInt32 && qweight.size(1) == KB &&
              qweight.size(2) == 32 && qweight.size(3) == 4,
              "int4_linear: qweight must be int32 (N/16, ", KB, ", 32, 4) for K=", K, ", got ",
              qweight.scalar_type(), " ", qweight.sizes(), "; build it with tinyinfer.quant.to_kernel_layout");
  const int64_t NT = qweight.size(0);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == NT && scales.size(1) == NG && scales.size(2) == 16,
              "int4_linear: scales must be (", NT, ", ", NG, ", 16) for K=", K, " and group size ", group_size,
              ", got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 || scales.scalar_type() == torch::kBFloat16,
              "int4_linear: scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == torch::kUInt8,
              "int4_linear: zeros must be uint8 of the scales' shape ", scales.sizes(), ", got ",
              zeros.scalar_type(), " ", zeros.sizes());
  for (const Tensor* t : {&qweight, &scales, &zeros}) {
    TORCH_CHECK(t->is_contiguous(), "int4_linear: qweight, scales and zeros must be contiguous (repack once "
                "at load with tinyinfer.quant.to_kernel_layout)");
    TORCH_CHECK(t->device() == x.device(), "int4_linear: x is on ", x.device(), " but a weight tensor is on ",
                t->device(), "; move the layer to the activations' device");
  }
  TORCH_CHECK(x.size(0) * std::max<int64_t>(NT * 16, K) < (int64_t(1) << 31),
              "int4_linear: shape too large for 32-bit indexing: M=", x.size(0), " N=", NT * 16, " K=", K);
  tinyinfer::Int4GemvParams p{};
  p.qweight = qweight.data_ptr();
  p.scales = scales.data_ptr();
  p.zeros = zeros.data_ptr<uint8_t>();
  p.M = static_cast<int>(x.size(0));
  p.N = static_cast<int>(NT * 16);
  p.K = static_cast<int>(K);
  p.group_size = static_cast<int>(group_size);
  p.x_bf16 = x.scalar_type() == torch::kBFloat16;
  p.scales_bf16 = scales.scalar_type() == torch::kBFloat16;
  int major = 0;  // programmatic dependent launch needs sm_90+
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  p.pdl = major >= 9;
  return p;
}

// Writes y = x @ dequant(W).T into `out` (M, N): the GEMV kernel for M <= 16, else dequantize W into
// a scratch buffer and call the dense matmul.
void int4_linear_out(const Tensor& x_in, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                     int64_t group_size, Tensor& out) {
  TORCH_CHECK(x_in.is_cuda(), "int4_linear: x must be a CUDA tensor, got ", x_in.device());
  tinyinfer::Int4GemvParams p = int4_params(x_in, qweight, scales, zeros, group_size);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == p.M && out.size(1) == p.N && out.is_contiguous() &&
              out.scalar_type() == x_in.scalar_type() && out.device() == x_in.device(),
              "int4_linear: out must be a contiguous ", x_in.scalar_type(), " (", p.M, ", ", p.N, ") tensor on ",
              x_in.device(), ", got ", out.scalar_type(), " ", out.sizes());
  if (p.M == 0 || p.N == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (p.M > 16) {
    Tensor w = torch::empty({p.N, p.K}, x_in.options());
    p.y = w.data_ptr();
    check_launch(tinyinfer::launch_int4_dequant(p, stream), "int4_dequant");
    torch::mm_out(out, x_in, w.t());
    return;
  }
  // The kernel reads rows of x with 16-byte loads.
  Tensor x = x_in.is_contiguous() && reinterpret_cast<uintptr_t>(x_in.data_ptr()) % 16 == 0
                 ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  p.x = x.data_ptr();
  p.y = out.data_ptr();
  check_launch(tinyinfer::launch_int4_gemv(p, stream), "int4_gemv");
}

Tensor int4_linear(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be (M, K), got shape ", x.sizes());
  Tensor out = torch::empty({x.size(0), qweight.size(0) * 16}, x.options());
  int4_linear_out(x, qweight, scales, zeros, group_size, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// paged_attention (cuda/paged_attention.cu): split-KV attention of 1..16 new queries per sequence
// ---------------------------------------------------------------------------------------------

// A cache the kernel can stream with 16-byte copies: unit last stride, rows and strides 16-byte aligned.
void check_attention_cache(const Tensor& cache, const Tensor& q, const char* name) {
  TORCH_CHECK(cache.dim() == 4, "paged_attention: ", name, " must be (num_blocks, block_size, n_kv_heads, "
              "head_dim), got shape ", cache.sizes());
  TORCH_CHECK(cache.device() == q.device(), "paged_attention: ", name, " is on ", cache.device(),
              " but q is on ", q.device());
  TORCH_CHECK(cache.scalar_type() == q.scalar_type(), "paged_attention: ", name, " is ", cache.scalar_type(),
              " but q is ", q.scalar_type(), "; the kernel reads cache and queries in one dtype");
  const int64_t elem = cache.element_size();
  bool aligned = cache.stride(3) == 1 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && cache.stride(d) >= 0 && cache.stride(d) * elem % 16 == 0;
  TORCH_CHECK(aligned, "paged_attention: ", name, " must have a unit-stride last dimension and 16-byte "
              "aligned rows (strides in bytes multiples of 16), got strides ", cache.strides(),
              " and address ", cache.data_ptr(), "; allocate the cache with torch.empty/zeros");
}

Tensor paged_attention(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& block_tables_in, const Tensor& seq_lens_in,
                       const Tensor& query_start_loc_in, double scale) {
  TORCH_CHECK(q_in.is_cuda(), "paged_attention: q must be a CUDA tensor, got one on ", q_in.device());
  TORCH_CHECK(q_in.dim() == 3, "paged_attention: q must be (T, n_heads, head_dim), got shape ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat16 || q_in.scalar_type() == torch::kBFloat16,
              "paged_attention: the CUDA kernel supports float16 and bfloat16, got ", q_in.scalar_type(),
              "; run the model in fp16/bf16 or call ops.paged_attention_reference");
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
              "128/128 and MLA 576/512. Call ops.paged_attention_reference for other shapes");
  TORCH_CHECK(tinyinfer::paged_attention_supports_block_size(static_cast<int>(BS)), "paged_attention: the CUDA "
              "kernel needs a power-of-two block size (8, 16, 32, ...), got ", BS,
              "; allocate the KV cache with such a block size or call ops.paged_attention_reference");
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
  TORCH_CHECK(B <= 65535 && T < (int64_t(1) << 31) && MB * BS < (int64_t(1) << 31),
              "paged_attention: shape too large for the launch grid: B=", B, " (max 65535), T=", T,
              ", max_blocks*block_size=", MB * BS);
  Tensor out = torch::empty({T, Hq, Dv}, q_in.options());
  if (T == 0) return out;

  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const Tensor block_tables = block_tables_in.stride(1) == 1 ? block_tables_in : block_tables_in.contiguous();
  const Tensor seq_lens = seq_lens_in.contiguous(), query_start_loc = query_start_loc_in.contiguous();
  const tinyinfer::PagedAttentionPlan plan = tinyinfer::paged_attention_plan(
      static_cast<int>(T), static_cast<int>(B), static_cast<int>(MB), static_cast<int>(BS),
      static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(Dv));
  // Split-KV workspace, sized from shapes only: partial outputs, then per-partition maxima and sums.
  Tensor ws = torch::empty({plan.workspace_floats}, q.options().dtype(torch::kFloat32));
  const int64_t partials = T * Hq * plan.num_partitions;

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
  a.ws_out = ws.data_ptr<float>();
  a.ws_max = a.ws_out + partials * Dv;
  a.ws_sum = a.ws_max + partials;
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
  // MLA passes v_cache = k_cache[..., :Dv]: same rows, so the kernel loads each latent row once.
  a.v_aliases_k = v_cache.data_ptr() == k_cache.data_ptr() && v_cache.stride(0) == k_cache.stride(0) &&
                  v_cache.stride(1) == k_cache.stride(1) && v_cache.stride(2) == k_cache.stride(2) && Dv <= D;
  check_launch(tinyinfer::paged_attention_launch(a, plan, c10::cuda::getCurrentCUDAStream()), "paged_attention");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tinyinfer CUDA kernels (see cuda/*.cu); called through the ops in tinyinfer/ops.py";
  m.def("int4_linear", &int4_linear, "y = x @ dequant(W).T for INT4 W in the kernel layout (tinyinfer/quant.py)",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"));
  m.def("int4_linear_out", &int4_linear_out, "int4_linear writing into a given (M, N) tensor (tests poison it)",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"), pybind11::arg("out"));
  m.def("paged_attention", &paged_attention, "Causal attention of 1..16 new queries per sequence over the "
        "paged K/V cache (split-KV + log-sum-exp merge); contract in docs/architecture.md",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("seq_lens"), pybind11::arg("query_start_loc"), pybind11::arg("scale"));
  m.def("store_kv", &store_kv, "Write K/V rows into their paged-cache slots (slot -1 skipped)",
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slot_mapping"));
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, scaled by weight (fp32 accumulation)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("fused_add_rmsnorm", &fused_add_rmsnorm, "(rms_norm(x + residual) * weight, x + residual) in one kernel",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rope_store_kv", &rope_store_kv, "RoPE on q and k + K/V write into the paged cache; returns (q, k)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("slot_mapping"));
}
