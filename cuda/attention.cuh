// attention.cuh -- index and softmax arithmetic shared by the paged-attention kernels and their host
// tests. Plain __host__ __device__ inline functions: no CUDA runtime, no torch, so g++ compiles this
// header for tests/host/test_attention.cpp and nvcc for cuda/paged_attention.cuh.
//
// Split-KV ("flash-decoding") in one paragraph: a sequence's keys are cut into partitions
// (attn_partition_keys of its actual length); each partition p yields, per query row, an unnormalised
// partial output O_p = sum_j exp2(s_j - m_p) v_j together with its running maximum m_p and sum
// l_p = sum_j exp2(s_j - m_p) (scores s are kept in log2 units: the kernel scales them by scale * log2(e)). The merge rescales
// every partition to the global maximum M = max_p m_p:  out = sum_p O_p w_p / sum_p l_p w_p,
// w_p = exp2(m_p - M). A partition whose keys are all masked for a row has m_p = -inf, l_p = 0 and
// O_p = 0: its weight must be exactly 0, never exp2(-inf - -inf) = NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"  // slots, block tables, sequence_of_row, query_position, CacheStrides

#ifdef __CUDACC__
#define TI_EXP2(x) exp2f(x)
#else
#define TI_EXP2(x) std::exp2(x)
#endif

namespace tinyinfer {

constexpr float kLog2e = 1.4426950408889634f;

// ---- block addressing ------------------------------------------------------------------------------

// Element offset of key position `pos` of one sequence, KV head `head`, in a cache with strides
// `st`: block table_row[pos / block_size], row pos % block_size. Callers ask only for pos < seq_len,
// so the table entry read is always one of the sequence's own blocks_for_tokens(seq_len) entries.
// Strides are never assumed: MLA's V is a view of K's first 512 columns.
__host__ __device__ inline int64_t key_row_offset(const int32_t* table_row, int pos, int block_size,
                                                  const CacheStrides& st, int head) {
  const int64_t block = table_row[pos / block_size];
  return cache_row_start(st, block, pos % block_size, head);
}

// ---- split-KV partitions, from the actual sequence length ------------------------------------------

// Keys per partition for a sequence of seq_len keys cut into at most num_splits partitions: an even share,
// rounded up to whole tiles, but never below min_chunk keys (short contexts use fewer partitions instead
// of many tiny ones). Read from seq_lens on the device, so the grid (num_splits CTAs per sequence and
// head chunk) stays fixed for CUDA graphs while the work follows the real length.
__host__ __device__ inline int attn_partition_keys(int seq_len, int num_splits, int tile, int min_chunk) {
  int part = (seq_len + num_splits - 1) / num_splits;
  part = (part + tile - 1) / tile * tile;
  return part > min_chunk ? part : min_chunk;
}

// Partitions that hold keys (the merge reads these); partition p covers [p * part, min(L, (p + 1) * part)).
__host__ __device__ inline int attn_live_partitions(int seq_len, int part) { return (seq_len + part - 1) / part; }

// ---- log-sum-exp merge (scores in log2 units) --------------------------------------------------------

__host__ __device__ inline float neg_inf() { return -INFINITY; }

// Factor that moves a sum taken against maximum m_old onto maximum m_new >= m_old. A sum that is still
// empty (m_old = -inf) contributes nothing: 0, not exp2(-inf - -inf) = NaN.
__host__ __device__ inline float rescale_factor(float m_old, float m_new) {
  return m_old == neg_inf() ? 0.0f : TI_EXP2(m_old - m_new);
}

// Running (max, sum) of exponentials; merging in an empty partition (m = -inf, l = 0) is a no-op.
struct LseState {
  float m;
  float l;
};

__host__ __device__ inline LseState lse_empty() { return {neg_inf(), 0.0f}; }

__host__ __device__ inline LseState lse_merge(LseState a, LseState b) {
  float m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf()) return lse_empty();
  return {m, a.l * rescale_factor(a.m, m) + b.l * rescale_factor(b.m, m)};
}

// Weight of partition (m_p) in the final output, already divided by the merged sum:
// out = sum_p weight_p * O_p. Zero when everything is masked (total.l == 0), never NaN.
__host__ __device__ inline float lse_weight(float m_p, LseState total) {
  if (total.l <= 0.0f) return 0.0f;
  return rescale_factor(m_p, total.m) / total.l;
}

// ---- tile configuration and shared-memory plan of the split kernel (cuda/paged_attention.cuh) ------

// W warps, TK keys per pipeline tile (a multiple of 16), STAGES-deep cp.async pipeline.
template <int W_, int TK_, int STAGES_>
struct AttnTile {
  static constexpr int kWarps = W_, kThreads = 32 * W_, TK = TK_, STAGES = STAGES_;
};

// Rows of K, V, Q and P tiles are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix
// then fall into 8 different 16-byte bank groups.
constexpr int kRowPad = 8;

struct AttnSmemPlan {
  int k_stage, v_stage;  // elements per pipeline stage (v_stage 0 when V aliases K)
  int v_off, q_off, p_off, f_off, i_off, total_bytes;  // byte offsets of the regions
};

// rows = 16 MT query rows per pass. Floats: per-key-group row maxima and row sums [TK/16][rows], running
// maxima [2][rows]; ints: row token, row head, row position [3][rows].
__host__ __device__ inline AttnSmemPlan attn_smem_plan(int head_dim, int head_dim_v, int tile, int stages, int rows,
                                                       int elem_bytes, bool v_aliases_k) {
  auto up16 = [](int x) { return (x + 15) / 16 * 16; };
  AttnSmemPlan s;
  s.k_stage = tile * (head_dim + kRowPad);
  s.v_stage = v_aliases_k ? 0 : tile * (head_dim_v + kRowPad);
  s.v_off = up16(stages * s.k_stage * elem_bytes);
  s.q_off = up16(s.v_off + stages * s.v_stage * elem_bytes);
  s.p_off = up16(s.q_off + rows * (head_dim + kRowPad) * elem_bytes);
  s.f_off = up16(s.p_off + rows * (tile + kRowPad) * elem_bytes);
  s.i_off = up16(s.f_off + (2 * (tile / 16) + 2) * rows * 4);
  s.total_bytes = up16(s.i_off + 3 * rows * 4);
  return s;
}

// ---- launcher arguments and plan (shared by paged_attention.cu and bindings) ----------------------------

enum class PagedAttentionDtype { kHalf, kBFloat16 };

// Raw view of the op's tensors. Strides are in elements; q, k and v have a unit last stride.
struct PagedAttentionArgs {
  const void* q;  int64_t q_s0, q_s1;                 // (T, Hq, D)
  const void* k;  int64_t k_s0, k_s1, k_s2;           // (NB, BS, Hkv, D)
  const void* v;  int64_t v_s0, v_s1, v_s2;           // (NB, BS, Hkv, Dv)
  const int32_t* block_tables; int64_t bt_stride;     // (B, MB)
  const int32_t* seq_lens;                            // (B,)
  const int32_t* query_start_loc;                     // (B + 1,)
  void* out;                                          // (T, Hq, Dv) contiguous
  float* ws_out; float* ws_max; float* ws_sum;        // workspace (num_splits > 1), see PagedAttentionPlan
  int num_tokens, num_seqs, max_blocks, num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size;
  int block_shift;                                    // log2(block_size): block sizes are powers of two
  float scale;
  PagedAttentionDtype dtype;
  bool v_aliases_k;                                   // v is k's first Dv columns: load rows once
  // A quantized cache (cuda/kv_quant.cuh): k / v hold int8 or fp8 bytes (strides in bytes), read as
  // byte x its float16 scale at k_scale[block * ks0 + offset * ks1 + head * ks2].
  int kv_quant;                                       // kKVNone (0), kKVInt8, kKVFp8
  const void* k_scale; int64_t ks0, ks1, ks2;
  const void* v_scale; int64_t vs0, vs1, vs2;
};

// Everything about the launch that depends on shapes and the device alone (never on seq_lens or
// query_start_loc), so a captured CUDA graph stays valid for any lengths.
struct PagedAttentionPlan {
  int chunk_heads;        // query heads of one KV group handled by one CTA
  int head_chunks;        // ceil(group / chunk_heads)
  int m_tiles;            // MT: 16-row m-tiles of (head, query) rows per pass (1, 2 or 4)
  int num_splits;         // P: CTAs per (sequence, KV head, head chunk) along the keys
  int min_chunk;          // fewest keys a partition takes (attn_partition_keys)
  int64_t workspace_floats;  // P > 1: T * Hq * P * (Dv + 2) (partial outputs, maxima, sums); else 0
};

// The largest m-tile count a head dim supports (registers for the output accumulators).
__host__ __device__ constexpr int attn_max_m_tiles(int head_dim) { return head_dim <= 128 ? 4 : 2; }

// Plan, part 1 (shapes only): a CTA takes chunk_heads query heads of one KV head x every new query of a
// sequence; MT m-tiles of 16 rows per pass from the mean q_len T / B (any q_len is correct: more rows
// take more passes over the partition).
inline PagedAttentionPlan attn_plan_shapes(const PagedAttentionArgs& a, int min_chunk) {
  PagedAttentionPlan plan{};
  const int group = a.num_q_heads / a.num_kv_heads, max_mt = attn_max_m_tiles(a.head_dim);
  plan.chunk_heads = group < 16 * max_mt ? group : 16 * max_mt;
  plan.head_chunks = (group + plan.chunk_heads - 1) / plan.chunk_heads;
  const int mean_q = a.num_seqs > 0 ? (a.num_tokens + a.num_seqs - 1) / a.num_seqs : 1;
  const int rows = plan.chunk_heads * (mean_q > 0 ? mean_q : 1);
  const int mt = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
  plan.m_tiles = mt < max_mt ? mt : max_mt;
  plan.min_chunk = min_chunk;
  plan.num_splits = 1;
  return plan;
}

// Plan, part 2 (shapes and the device): key partitions per sequence so that the CTAs fill `fill` x the
// resident slots (SMs x CTAs per SM), with no partition shorter than min_chunk keys at the longest
// context the block table allows; the workspace they need.
inline void attn_plan_splits(const PagedAttentionArgs& a, int slots, float fill, PagedAttentionPlan* plan) {
  const int64_t ctas = static_cast<int64_t>(a.num_seqs) * a.num_kv_heads * plan->head_chunks;
  int64_t p = ctas > 0 ? static_cast<int64_t>(fill * slots) / ctas : 1;
  const int64_t most = (static_cast<int64_t>(a.max_blocks) * a.block_size + plan->min_chunk - 1) / plan->min_chunk;
  p = p < most ? p : most;
  plan->num_splits = p < 1 ? 1 : static_cast<int>(p);
  plan->workspace_floats = plan->num_splits == 1 ? 0 : static_cast<int64_t>(a.num_tokens) * a.num_q_heads *
                                                           plan->num_splits * (a.head_dim_v + 2);
}

inline int log2_if_power_of_two(int x) {
  int s = 0;
  while (s < 31 && (1 << s) < x) ++s;
  return x > 0 && (1 << s) == x ? s : -1;
}

// The kernel finds a key's block with a shift: block sizes must be powers of two (8, 16, 32, ...).
inline bool paged_attention_supports_block_size(int block_size) {
  return block_size > 0 && block_size <= (1 << 20) && log2_if_power_of_two(block_size) >= 0;
}

inline bool paged_attention_supports(int head_dim, int head_dim_v) {
  return (head_dim == 64 && head_dim_v == 64) || (head_dim == 128 && head_dim_v == 128) ||
         (head_dim == 576 && head_dim_v == 512);
}

}  // namespace tinyinfer
