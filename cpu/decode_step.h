// decode_step.h -- a whole decode (or short verify) step of a Llama-family decoder in one C++ call: for
// each layer, residual add + RMSNorm, the q/k/v projection, RoPE + K/V write into the paged cache
// (Kwon et al., SOSP 2023), paged attention, the output projection, residual add + RMSNorm, the SwiGLU
// MLP (Shazeer, 2020); then the final norm. It calls the very functions the per-op path reaches through
// the dispatcher (cpu/norm.h, cpu/rope_store_kv.h, cpu/paged_attention.h, the same ATen matmuls with the
// same arguments), so it computes the per-op path's bits; what it removes is the Python between them:
// module calls, custom-op dispatch, views (~10 ms of a 23 ms SmolLM2 step, docs/cpu-performance.md).
// tinyinfer/models/fused_cpu.py decides when it applies and builds its argument lists once per model.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>

#include <vector>

#include "int4_linear.h"
#include "norm.h"
#include "paged_attention.h"
#include "rope_store_kv.h"

namespace tinyinfer_cpu {

// How one linear's weight is held (tinyinfer/ops/cpu_matmul.py: linear_form), and what multiplies by it.
enum LinearKind : int64_t {
  kInt4Pack = 0,     // a = packed uint8 (N, K/2), b = scale_and_zero bf16 (K/G, N, 2): torch's CPU INT4
  kOneDnn = 1,       // a = oneDNN-reordered weight (mkldnn::_linear_pointwise)
  kTransposed = 2,   // a = (K, N) row-major copy, one row: x @ a
  kDequantized = 3,  // a = float32 (N, K): (x.float() @ a.T).to(x.dtype)
  kDense = 4,        // a = (N, K): at::linear
  kInt4 = 5,         // a = qweight, b = scales of the INT4 kernel layout; the zeros trail the list
};

// mkldnn::_linear_pointwise(x, w, None, "none", [], ""), as ops/cpu_matmul.py calls it; it is not an
// at:: function, so it goes through the dispatcher (boxed: no C++ signature to keep in step with torch).
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x (M, K) -> (M, N) through the form `kind` of the weight.
inline at::Tensor linear_by(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b,
                            int64_t group, const at::Tensor* zeros = nullptr) {
  switch (kind) {
    case kInt4: return int4_linear(x, a, b, *zeros, group);
    case kInt4Pack: return at::_weight_int4pack_mm_for_cpu(x.contiguous(), a, group, b);
    case kOneDnn: return onednn_linear(x, a);
    case kTransposed: return at::mm(x, a);
    case kDequantized: return at::mm(x.to(at::kFloat), a.t()).to(x.scalar_type());
    case kDense: return at::linear(x, a);
    default: TORCH_CHECK(false, "decode_layers: unknown linear kind ", kind);
  }
}

// x (T, hidden): the step's embeddings. weights: per layer [input norm (hidden,), post-attention norm
// (hidden,), then (a, b) for qkv, o, gate_up, down] (10 tensors), then the final norm's weight, then
// the zeros of each kInt4 linear in order (its kernel takes three tensors, a pair slot holds two);
// kinds / groups: 4 per layer (LinearKind, INT4 group size). dims = [Hq, Hkv, D]. The caches, the
// block tables and the step's metadata as the per-op path passes them; k_scales / v_scales: a quantized
// cache's scales per layer (empty: a model-dtype cache), as rope_store_kv and paged_attention take them.
// -> hidden (T, hidden), normed.
inline at::Tensor decode_layers(const at::Tensor& x, at::TensorList weights, at::IntArrayRef kinds,
                                at::IntArrayRef groups, at::IntArrayRef dims, double eps,
                                const at::Tensor& cos_sin_cache, const at::Tensor& positions,
                                at::TensorList k_caches, at::TensorList v_caches,
                                const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                double scale, at::TensorList k_scales, at::TensorList v_scales) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(x.dim() == 2 && dims.size() == 3 && static_cast<int64_t>(v_caches.size()) == L &&
                  static_cast<int64_t>(weights.size()) >= 10 * L + 1 &&
                  static_cast<int64_t>(kinds.size()) == 4 * L && static_cast<int64_t>(groups.size()) == 4 * L,
              "decode_layers: ", L, " layers need 10 per layer + 1 weights and 4 kinds and groups per "
              "layer, got ", weights.size(), ", ", kinds.size(), ", ", groups.size());
  const bool scaled = !k_scales.empty();
  TORCH_CHECK(k_scales.size() == v_scales.size() && (!scaled || static_cast<int64_t>(k_scales.size()) == L),
              "decode_layers: ", L, " layers need no cache scales or one k and one v scale each, got ",
              k_scales.size(), " and ", v_scales.size());
  const int64_t T = x.size(0), Hq = dims[0], Hkv = dims[1], D = dims[2];
  const std::vector<int64_t> splits = {Hq * D, Hkv * D, Hkv * D};
  // The residual stream in float32 where x is half precision (layers/norm.py: residual_stream).
  at::Tensor h, stream = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat), out = x;
  int64_t int4_zeros = 10 * L + 1;                       // the next kInt4 linear's zeros
  auto linear = [&](const at::Tensor& in, int64_t kind, const at::Tensor& a, const at::Tensor& b,
                    int64_t g) {
    if (kind != kInt4) return linear_by(in, kind, a, b, g);
    TORCH_CHECK(int4_zeros < static_cast<int64_t>(weights.size()), "decode_layers: the zeros of INT4 "
                "linear ", int4_zeros - 10 * L, " are missing from the weight list");
    return linear_by(in, kind, a, b, g, &weights[int4_zeros++]);
  };
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 10 * l;
    const int64_t* kind = kinds.data() + 4 * l;
    const int64_t* group = groups.data() + 4 * l;
    if (l == 0) {
      h = rms_norm(x, w[0], eps);
    } else {
      std::tie(h, stream) = fused_add_rmsnorm(out, stream, w[0], eps);
    }
    // Attention (layers/attention.py: MultiHeadAttention.forward).
    const at::Tensor qkv = linear(h, kind[0], w[2], w[3], group[0]);             // (T, (Hq + 2 Hkv) D)
    const std::vector<at::Tensor> parts = qkv.split_with_sizes(splits, -1);
    const std::optional<at::Tensor> ks = scaled ? std::optional(k_scales[l]) : std::nullopt;
    const std::optional<at::Tensor> vs = scaled ? std::optional(v_scales[l]) : std::nullopt;
    auto [q, k] = rope_store_kv(parts[0].view({T, Hq, D}), parts[1].view({T, Hkv, D}),
                                parts[2].view({T, Hkv, D}), cos_sin_cache, positions, k_caches[l],
                                v_caches[l], slot_mapping, ks, vs);
    const at::Tensor att = paged_attention(q, k_caches[l], v_caches[l], block_tables, seq_lens,
                                           query_start_loc, scale, ks, vs);        // (T, Hq, D)
    h = linear(att.reshape({T, Hq * D}), kind[1], w[4], w[5], group[1]);
    std::tie(h, stream) = fused_add_rmsnorm(h, stream, w[1], eps);
    // SwiGLU (layers/mlp.py; ops/reference.py: silu_and_mul).
    const at::Tensor gate_up = linear(h, kind[2], w[6], w[7], group[2]);      // (T, 2F)
    const std::vector<at::Tensor> gu = gate_up.chunk(2, -1);
    out = linear(at::silu(gu[0]).mul_(gu[1]), kind[3], w[8], w[9], group[3]);
  }
  return std::get<0>(fused_add_rmsnorm(out, stream, weights[10 * L], eps));
}

}  // namespace tinyinfer_cpu
