// paged_attention.h -- causal attention of each sequence's new queries over its paged K/V cache, read in
// place through the block table (Kwon et al., "Efficient Memory Management for LLM Serving with
// PagedAttention", SOSP 2023): no gathered copy of the context is made. Per (sequence, KV head), the
// pointers to its K and V rows are listed once; then for each query row of the head group (GQA, MQA
// and MLA share a KV head's rows, re-read from cache):
//   scores  against the visible keys, 16 keys at a time (16 independent accumulators with AVX-512),
//   softmax in float32 (max subtracted; an exp written to vectorize, cpu/common.h),
//   output  the weighted sum of the V rows, divided by the softmax's sum.
// Query i of sequence b (q_len_b rows, seq_lens[b] cached tokens including them) sits at position
// seq_lens[b] - q_len_b + i and sees keys 0..that; rows past query_start_loc[B] stay zero. The contract
// is ops.paged_attention's (docs/architecture.md); tests/test_cpu_kernels.py checks it against float64.
// Single-threaded: the CPU engine runs one torch thread (docs/cpu-performance.md).
#pragma once

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace tinyinfer_cpu {

#if defined(__AVX512F__)
// Scores of one query row against 16 keys at once: 16 independent accumulators (no dependency chain
// between keys), one horizontal sum each. Keys past `count` repeat the last one (results unused).
inline void scores16(const float* q, const float* const* keys, int64_t count, int64_t D, float scale,
                     float* out) {
  __m512 acc[16];
  const float* k[16];
  for (int j = 0; j < 16; ++j) {
    acc[j] = _mm512_setzero_ps();
    k[j] = keys[j < count ? j : count - 1];
  }
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 x = _mm512_loadu_ps(q + d);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(x, _mm512_loadu_ps(k[j] + d)));
  }
  for (int64_t j = 0; j < count; ++j) out[j] = _mm512_reduce_add_ps(acc[j]) * scale;
}

// acc (64 floats, 4 registers) = sum_p w[p] * v[p][0..64) over `count` keys; Dv chunk of <= 64.
inline void weighted_sum64(const float* w, const float* const* v, int64_t count, int64_t width,
                           float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const int lanes = static_cast<int>(width / 16);
  for (int64_t p = 0; p < count; ++p) {
    const __m512 wp = _mm512_set1_ps(w[p]);
    for (int i = 0; i < 4; ++i)
      if (i < lanes) acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(wp, _mm512_loadu_ps(v[p] + 16 * i)));
  }
  for (int i = 0; i < lanes; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
#endif

// Row r's scores against keys[0..count) (float rows of D), times scale.
inline void row_scores(const float* q, const float* const* keys, int64_t count, int64_t D, float scale,
                       float* out) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t p = 0; p < count; p += 16)
      scores16(q, keys + p, std::min<int64_t>(16, count - p), D, scale, out + p);
    return;
  }
#endif
  for (int64_t p = 0; p < count; ++p) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * keys[p][d];
    out[p] = s * scale;
  }
}

// out[0..Dv) = sum_p w[p] * values[p][0..Dv).
inline void row_weighted_sum(const float* w, const float* const* values, int64_t count, int64_t Dv,
                             float* out) {
#if defined(__AVX512F__)
  if (Dv % 16 == 0) {
    std::vector<const float*> shifted(count);
    for (int64_t c = 0; c < Dv; c += 64) {
      for (int64_t p = 0; p < count; ++p) shifted[p] = values[p] + c;
      weighted_sum64(w, shifted.data(), count, std::min<int64_t>(64, Dv - c), out + c);
    }
    return;
  }
#endif
  std::fill(out, out + Dv, 0.f);
  for (int64_t p = 0; p < count; ++p)
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) out[d] += w[p] * values[p][d];
}

// Pointers to the float32 rows of positions 0..L of one sequence and KV head: the cache rows themselves
// for a float32 cache, else rows converted once into `buffer` -- times their scale for a quantized
// cache (`scale`: this head's scale of slot (block, offset) at block * ss0 + offset * ss1).
template <typename C>
void cache_rows(const C* base, const int32_t* table, int64_t L, int64_t BS, int64_t NB, int64_t s0,
                int64_t s1, int64_t width, std::vector<float>& buffer, std::vector<const float*>& rows,
                const c10::Half* scale = nullptr, int64_t ss0 = 0, int64_t ss1 = 0) {
  rows.resize(L);
  if constexpr (!std::is_same_v<C, float>) buffer.resize(L * width);
  for (int64_t p0 = 0; p0 < L; p0 += BS) {           // block by block: no division per position
    const int64_t id = table[p0 / BS];
    TORCH_CHECK(id >= 0 && id < NB, "paged_attention: block table entry ", id, " for position ", p0,
                " is outside the cache's ", NB, " blocks");
    const C* block = base + id * s0;
    for (int64_t p = p0; p < std::min(L, p0 + BS); ++p) {
      const C* src = block + (p - p0) * s1;
      if constexpr (std::is_same_v<C, float>) {
        rows[p] = src;
      } else {
        float* dst = &buffer[p * width];
        if constexpr (std::is_same_v<C, c10::Float8_e4m3fn>) {
          const float sf = static_cast<float>(scale[id * ss0 + (p - p0) * ss1]);
          const uint8_t* bytes = reinterpret_cast<const uint8_t*>(src);
          int64_t d = 0;
#if defined(__AVX512F__)
          for (; d + 16 <= width; d += 16) _mm512_storeu_ps(dst + d, fp8_e4m3_times16(bytes + d, sf));
#endif
          for (; d < width; ++d) dst[d] = fp8_e4m3_times(bytes[d], sf);
        } else if (scale != nullptr) {
          const float sf = static_cast<float>(scale[id * ss0 + (p - p0) * ss1]);
          for (int64_t d = 0; d < width; ++d) dst[d] = load(src + d) * sf;
        } else {
          for (int64_t d = 0; d < width; ++d) dst[d] = load(src + d);
        }
        rows[p] = dst;
      }
    }
  }
}

// A quantized cache's float16 scales, as paged_attention_impl reads them per KV head (null: none).
struct HeadScales {
  const c10::Half* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  explicit HeadScales(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 3,
                "paged_attention: kv cache scales must be float16 (blocks, block_size, Hkv)");
    p = t->const_data_ptr<c10::Half>();
    s0 = t->stride(0);
    s1 = t->stride(1);
    s2 = t->stride(2);
  }
  const c10::Half* head(int64_t h) const { return p == nullptr ? nullptr : p + h * s2; }
};

// T: q and output dtype; C: the cache's (T itself, or int8 / fp8 e4m3 with scales).
template <typename T, typename C>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const int32_t* tables, int64_t table_stride, const int32_t* lens,
                          const int32_t* qsl, int64_t B, float scale, at::Tensor& out,
                          const HeadScales& ks, const HeadScales& vs) {
  const int64_t Hq = q.size(1), D = q.size(2), BS = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t Dv = v_cache.size(3), G = Hq / Hkv;
  const T* qp = q.const_data_ptr<T>();
  const C* kp = reinterpret_cast<const C*>(k_cache.const_data_ptr());
  const C* vp = reinterpret_cast<const C*>(v_cache.const_data_ptr());
  T* op = out.mutable_data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  std::vector<float> qf(D), scores, acc(Dv), kbuf, vbuf;
  std::vector<const float*> krows, vrows;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q0 = qsl[b], n = qsl[b + 1] - q0, L = lens[b];
    if (n <= 0) continue;
    TORCH_CHECK(L >= n, "paged_attention: sequence ", b, " has ", n, " new queries but seq_lens ", L,
                " (seq_lens count the cached tokens including the new ones)");
    const int32_t* table = tables + b * table_stride;
    scores.resize(L);
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      cache_rows(kp + kvh * k_cache.stride(2), table, L, BS, k_cache.size(0), k_cache.stride(0),
                 k_cache.stride(1), D, kbuf, krows, ks.head(kvh), ks.s0, ks.s1);
      cache_rows(vp + kvh * v_cache.stride(2), table, L, BS, v_cache.size(0), v_cache.stride(0),
                 v_cache.stride(1), Dv, vbuf, vrows, vs.head(kvh), vs.s0, vs.s1);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t visible = L - n + i + 1;          // query i sees keys 0 .. L - n + i
        for (int64_t g = 0; g < G; ++g) {
          const T* src = qp + (q0 + i) * qs0 + (kvh * G + g) * qs1;
          for (int64_t d = 0; d < D; ++d) qf[d] = load(src + d);
          float* s = scores.data();
          row_scores(qf.data(), krows.data(), visible, D, scale, s);
          // Softmax in float32, its max subtracted; the sum divides the weighted sum at the end.
          float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
          for (int64_t p = 0; p < visible; ++p) m = std::max(m, s[p]);
          const float sum = exp_shifted(s, visible, m);
          row_weighted_sum(s, vrows.data(), visible, Dv, acc.data());
          T* dst = op + ((q0 + i) * Hq + kvh * G + g) * Dv;
          const float inv = 1.f / sum;
          for (int64_t d = 0; d < Dv; ++d) store(dst + d, acc[d] * inv);
        }
      }
    }
  }
}

// q (T, Hq, D); k_cache (NB, BS, Hkv, D); v_cache (NB, BS, Hkv, Dv), maybe a strided view of k_cache;
// block_tables (B, MB) int32; seq_lens (B,) int32; query_start_loc (B + 1,) int32 -> (T, Hq, Dv).
inline at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  const at::Tensor& query_start_loc, double scale,
                                  const std::optional<at::Tensor>& k_scale,
                                  const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_attention: q must be (T, Hq, D) and the caches (blocks, block_size, Hkv, D)");
  const bool quantized = is_quantized(k_cache);
  TORCH_CHECK((quantized || q.scalar_type() == k_cache.scalar_type()) &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype (or the caches be fp8 / int8), got ",
              q.scalar_type(), ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(!quantized || (k_scale.has_value() && v_scale.has_value()),
              "paged_attention: a ", k_cache.scalar_type(), " cache needs k_scale and v_scale");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: the head dimension of q and of the caches must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && v_cache.size(2) == k_cache.size(2) &&
                  k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0,
              "paged_attention: q ", q.sizes(), " does not fit the cache ", k_cache.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "paged_attention: block_tables, seq_lens and query_start_loc must be int32");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_tables.size(0) == B,
              "paged_attention: ", B, " sequences need ", B + 1, " query starts and ", B,
              " block tables, got ", query_start_loc.size(0), " and ", block_tables.size(0));
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  const at::Tensor starts = query_start_loc.contiguous();
  at::Tensor out = at::zeros({q.size(0), q.size(1), v_cache.size(3)}, q.options());
  const HeadScales ks(quantized ? k_scale : std::nullopt), vs(quantized ? v_scale : std::nullopt);
  TINYINFER_CPU_DISPATCH(q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto cache_type) {
      using C = decltype(cache_type);
      paged_attention_impl<scalar_t, C>(q, k_cache, v_cache, tables.const_data_ptr<int32_t>(),
                                        tables.size(1), lens.const_data_ptr<int32_t>(),
                                        starts.const_data_ptr<int32_t>(), B, static_cast<float>(scale), out,
                                        ks, vs);
    };
    if (k_cache.scalar_type() == at::kChar) run(int8_t{});
    else if (k_cache.scalar_type() == at::kFloat8_e4m3fn) run(c10::Float8_e4m3fn{});
    else run(scalar_t{});
  });
  return out;
}

}  // namespace tinyinfer_cpu
