// rope_store_kv.h -- RoPE (Su et al., "RoFormer", 2021) in the rotate-half layout on q and k, with the
// cos/sin row of each token's position read from the table, then the rotated k and v written into their
// paged-cache slots (Kwon et al., SOSP 2023); and store_kv, the write alone. One pass over the rows
// instead of the reference's dozen tensor ops (ops/reference.py), computing what it computes bit for
// bit: each output is x * c + (+-x') * s with each product and the sum rounded to the tensor dtype, as
// the reference's separate multiplies and add round them (this file is compiled without contracting
// a * b + c into one fused multiply-add: tinyinfer/extensions/cpu.py). tests/test_fused_ops.py holds the
// model to the unfused math bit for bit; tests/test_cpu_kernels.py checks these against the references.
#pragma once

#include <cmath>
#include <optional>
#include <type_traits>

#include "common.h"

namespace tinyinfer_cpu {

// Rows x (T, H, D) rotated into out (T, H, D) contiguous; table row p = [cos(p f) | sin(p f)] (D).
template <typename T>
void rotate_rows(const at::Tensor& x, const T* table, int64_t table_stride, const int64_t* pos,
                 at::Tensor& out) {
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  for (int64_t t = 0; t < Tn; ++t) {
    const T* c = table + pos[t] * table_stride;
    const T* s = c + half;
    for (int64_t h = 0; h < H; ++h) {
      const T* src = xp + t * x.stride(0) + h * x.stride(1);
      T* dst = op + (t * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(src + i), x2 = load(src + half + i), ci = load(c + i), si = load(s + i);
        dst[i] = static_cast<T>(round_to<T>(x1 * ci) + round_to<T>(-x2 * si));
        dst[half + i] = static_cast<T>(round_to<T>(x2 * ci) + round_to<T>(x1 * si));
      }
    }
  }
}

// Rows of src (T, H, D) into cache (NB, BS, H, D) at slots (T,) int64; slot -1 is padding, skipped.
template <typename T>
void write_slots(const at::Tensor& src, at::Tensor& cache, const int64_t* slots) {
  const int64_t Tn = src.size(0), H = src.size(1), D = src.size(2), BS = cache.size(1);
  const T* sp = src.const_data_ptr<T>();
  T* cp = cache.mutable_data_ptr<T>();
  for (int64_t t = 0; t < Tn; ++t) {
    if (slots[t] < 0) continue;
    TORCH_CHECK(slots[t] < cache.size(0) * BS, "store_kv: slot ", slots[t], " is outside the cache of ",
                cache.size(0) * BS, " slots");
    T* row = cp + (slots[t] / BS) * cache.stride(0) + (slots[t] % BS) * cache.stride(1);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d)
        row[h * cache.stride(2) + d] = sp[t * src.stride(0) + h * src.stride(1) + d];
  }
}

// A quantized cache's scales, one per slot and head: (NB, BS, H) float16 (tinyinfer/ops/kv_quant.py).
struct SlotScales {
  c10::Half* p;
  int64_t s0, s1, s2;
  SlotScales(const at::Tensor& t) : p(t.data_ptr<c10::Half>()) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.dim() == 3,
                "kv cache scales must be float16 (blocks, block_size, H); got ", t.scalar_type(), " ", t.sizes());
    s0 = t.stride(0);
    s1 = t.stride(1);
    s2 = t.stride(2);
  }
  c10::Half* at(int64_t block, int64_t offset, int64_t h) const { return p + block * s0 + offset * s1 + h * s2; }
};

// One row x[0..D) quantized into q[0..D) with its own scale (amax / 127 for int8, / 448 for fp8 e4m3,
// rounded to float16, at least 2^-14, written to *scale); the reference's float32 steps in order
// (divide by the stored scale, round half to even / clamp, cast).
template <typename T, typename C>
inline void quantize_row(const T* x, C* q, int64_t D, c10::Half* scale) {
  constexpr float qmax = std::is_same_v<C, int8_t> ? 127.f : 448.f;
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(load(x + d)));
  const c10::Half s(std::min(std::max(amax / qmax, 6.103515625e-05f), 65504.f));
  *scale = s;
  const float sf = static_cast<float>(s);
  if constexpr (std::is_same_v<C, int8_t>) {
    for (int64_t d = 0; d < D; ++d)
      q[d] = static_cast<int8_t>(std::min(std::max(std::nearbyint(load(x + d) / sf), -127.f), 127.f));
  } else {
    for (int64_t d = 0; d < D; ++d)
      q[d] = C(std::min(std::max(load(x + d) / sf, -448.f), 448.f));
  }
}

// Rows of src (T, H, D) quantized into cache (NB, BS, H, D) of type C at slots (T,); -1 skipped.
template <typename T, typename C>
void write_slots_quantized(const at::Tensor& src, at::Tensor& cache, const int64_t* slots,
                           const SlotScales& scales) {
  const int64_t Tn = src.size(0), H = src.size(1), D = src.size(2), BS = cache.size(1);
  const T* sp = src.const_data_ptr<T>();
  C* cp = reinterpret_cast<C*>(cache.data_ptr());
  for (int64_t t = 0; t < Tn; ++t) {
    if (slots[t] < 0) continue;
    TORCH_CHECK(slots[t] < cache.size(0) * BS, "store_kv: slot ", slots[t], " is outside the cache of ",
                cache.size(0) * BS, " slots");
    const int64_t block = slots[t] / BS, offset = slots[t] % BS;
    C* row = cp + block * cache.stride(0) + offset * cache.stride(1);
    for (int64_t h = 0; h < H; ++h)
      quantize_row<T, C>(sp + t * src.stride(0) + h * src.stride(1), row + h * cache.stride(2), D,
                         scales.at(block, offset, h));
  }
}

inline void check_cache(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& slots,
                        const char* what) {
  TORCH_CHECK(rows.dim() == 3 && cache.dim() == 4 && rows.size(0) == slots.size(0) &&
                  rows.size(1) == cache.size(2) && rows.size(2) == cache.size(3),
              "store_kv: ", what, " rows ", rows.sizes(), " do not fit the cache ", cache.sizes(),
              " with ", slots.size(0), " slots");
  TORCH_CHECK((rows.scalar_type() == cache.scalar_type() || is_quantized(cache)) && rows.stride(2) == 1 &&
                  cache.stride(3) == 1,
              "store_kv: ", what, " rows and cache must share a dtype (or the cache be fp8 / int8) and "
              "have a contiguous last dim");
}

// rows into cache at slots: a plain copy, or quantized with `scale` (required for fp8 / int8 caches).
inline void write_rows(const at::Tensor& rows, at::Tensor& cache, const int64_t* slots,
                       const std::optional<at::Tensor>& scale) {
  if (!is_quantized(cache)) {
    TINYINFER_CPU_DISPATCH(rows.scalar_type(), "store_kv", [&] { write_slots<scalar_t>(rows, cache, slots); });
    return;
  }
  TORCH_CHECK(scale.has_value(), "store_kv: a ", cache.scalar_type(), " cache needs its scales");
  const SlotScales scales(*scale);
  TINYINFER_CPU_DISPATCH(rows.scalar_type(), "store_kv", [&] {
    if (cache.scalar_type() == at::kChar)
      write_slots_quantized<scalar_t, int8_t>(rows, cache, slots, scales);
    else
      write_slots_quantized<scalar_t, c10::Float8_e4m3fn>(rows, cache, slots, scales);
  });
}

// k (T, Hkv, D), v (T, Hkv, Dv) | None -> their cache slots (slot_mapping int64, -1 skipped).
// A quantized cache (fp8 / int8) takes its scales: k_scale / v_scale (tinyinfer/ops/kv_quant.py).
inline void store_kv(const at::Tensor& k, const std::optional<at::Tensor>& v, at::Tensor k_cache,
                     std::optional<at::Tensor> v_cache, const at::Tensor& slot_mapping,
                     const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "store_kv: slot_mapping must be a 1-d int64 tensor");
  const at::Tensor slots = slot_mapping.contiguous();
  check_cache(k, k_cache, slots, "k");
  write_rows(k, k_cache, slots.const_data_ptr<int64_t>(), k_scale);
  if (v.has_value()) {
    TORCH_CHECK(v_cache.has_value(), "store_kv: v given without v_cache");
    check_cache(*v, *v_cache, slots, "v");
    write_rows(*v, *v_cache, slots.const_data_ptr<int64_t>(), v_scale);
  }
}

// q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv), cos_sin_cache (P, D), positions (T,) int64 ->
// (rotated q, rotated k), contiguous; rotated k and v stored at slot_mapping.
inline std::tuple<at::Tensor, at::Tensor> rope_store_kv(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_sin_cache,
    const at::Tensor& positions, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(2) % 2 == 0 && cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == q.size(2),
              "rope_store_kv: q ", q.sizes(), ", k ", k.sizes(), " and the table ", cos_sin_cache.sizes(),
              " do not fit (T, H, D), (P, D) with an even D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos_sin_cache.scalar_type() &&
                  q.stride(2) == 1 && k.stride(2) == 1 && cos_sin_cache.stride(1) == 1,
              "rope_store_kv: q, k and the table must share a dtype and have a contiguous last dim");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.size(0) == q.size(0),
              "rope_store_kv: positions must be int64, one per row");
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < pos.size(0); ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos_sin_cache.size(0), "rope_store_kv: position ", pp[t],
                " is outside the rotary table of ", cos_sin_cache.size(0), " rows");
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  TINYINFER_CPU_DISPATCH(q.scalar_type(), "rope_store_kv", [&] {
    const scalar_t* table = cos_sin_cache.const_data_ptr<scalar_t>();
    rotate_rows<scalar_t>(q, table, cos_sin_cache.stride(0), pp, q_out);
    rotate_rows<scalar_t>(k, table, cos_sin_cache.stride(0), pp, k_out);
  });
  store_kv(k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
  return {q_out, k_out};
}

}  // namespace tinyinfer_cpu
