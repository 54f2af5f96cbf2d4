// attention.cuh -- index and softmax arithmetic shared by the paged-attention kernels and their host
// tests. Plain __host__ __device__ inline functions: no CUDA runtime, no torch, so g++ compiles this
// header for tests/host/test_attention.cpp and nvcc for cuda/paged_attention.cu.
//
// Split-KV ("flash-decoding") in one paragraph: a sequence's keys are cut into partitions of
// `partition_tokens` keys; each partition p yields, per query row, an unnormalised partial output
// O_p = sum_j exp2(s_j - m_p) v_j together with its running maximum m_p and sum l_p = sum_j exp2(s_j - m_p)
// (scores s are kept in log2 units: the kernel folds log2(e) into the query scale). The merge rescales
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

// ---- partitions --------------------------------------------------------------------------------------

__host__ __device__ inline int num_partitions(int tokens, int partition_tokens) {
  return (tokens + partition_tokens - 1) / partition_tokens;
}

// Partition length chosen from tensor shapes only (so a CUDA graph replays for any seq_lens): start
// at 256 keys (8 tiles of 32: enough work per CTA to amortise its pipeline fill) and double while the
// grid would exceed ~2048 CTAs (more only adds merge traffic). ctas_per_partition = B * Hkv * chunks.
__host__ __device__ inline int choose_partition_tokens(int64_t ctas_per_partition, int max_tokens) {
  int part = 256;
  while (part < 8192 && ctas_per_partition * num_partitions(max_tokens, part) > 2048) part *= 2;
  return part;
}

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

// ---- shared-memory plan of the split kernel (host computes the launch size from it) -------------------

// Rows of K/V tiles are padded by 8 elements (16 bytes) so that 8 lanes reading the same column chunk
// of 8 consecutive rows hit 8 different bank groups.
constexpr int kRowPad = 8;

// cp.async pipeline depth: 4 stages (3 tiles in flight) for D <= 128; MLA's 576-wide rows fit 3.
__host__ __device__ constexpr int attn_pipeline_stages(int head_dim) { return head_dim <= 128 ? 4 : 3; }
constexpr int kAttnThreads = 128;
// Keys per pipeline tile: 32 (16 for MLA, whose rows are 4.5x wider).
__host__ __device__ constexpr int attn_tile_tokens(int head_dim) { return head_dim <= 128 ? 32 : 16; }

struct SplitSmemPlan {
  int k_stage_elems;   // one pipeline stage of K: tile_tokens * (D + pad)
  int v_stage_elems;   // one stage of V (0 when V aliases K)
  int stage_bytes;     // all K/V stages, or the output-reduction scratch reusing them, whichever is larger
  int total_bytes;
};

__host__ __device__ inline SplitSmemPlan split_smem_plan(int head_dim, int head_dim_v, int tile_tokens,
                                                         int stages, int rows, int threads,
                                                         int elem_bytes, bool v_aliases_k) {
  SplitSmemPlan s;
  s.k_stage_elems = tile_tokens * (head_dim + kRowPad);
  s.v_stage_elems = v_aliases_k ? 0 : tile_tokens * (head_dim_v + kRowPad);
  int kv_bytes = stages * (s.k_stage_elems + s.v_stage_elems) * elem_bytes;
  int pairs = head_dim_v / 2;
  int subsets = pairs >= threads ? 1 : threads / pairs;  // token subsets whose partial outputs are summed
  int scratch = subsets > 1 ? subsets * rows * head_dim_v * 4 : 0;
  s.stage_bytes = kv_bytes > scratch ? kv_bytes : scratch;
  s.stage_bytes = (s.stage_bytes + 15) / 16 * 16;
  int slices = threads / tile_tokens;
  int q_bytes = rows * head_dim * 4;                    // scaled queries, fp32
  int red_bytes = slices * rows * tile_tokens * 4;      // per-slice partial scores
  int p_bytes = rows * tile_tokens * 4;                 // scores, then probabilities
  int row_bytes = 6 * rows * 4;                         // m, l, alpha, row t, head, position
  s.total_bytes = s.stage_bytes + q_bytes + red_bytes + p_bytes + row_bytes;
  return s;
}

// ---- launcher arguments and plan (shared by paged_attention.cu and bindings.cpp) ---------------------

constexpr int kAttnMaxRows = 16;  // query rows (heads x new tokens) a CTA holds in registers per pass

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
  float* ws_out; float* ws_max; float* ws_sum;        // workspace, see PagedAttentionPlan
  int num_tokens, num_seqs, max_blocks, num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size;
  int block_shift;                                    // log2(block_size): block sizes are powers of two
  float scale;
  PagedAttentionDtype dtype;
  bool v_aliases_k;                                   // v is k's first Dv columns: load rows once
};

// Everything about the launch that depends on shapes alone (never on seq_lens / query_start_loc).
struct PagedAttentionPlan {
  int chunk_heads;        // query heads of one KV group handled by one CTA
  int head_chunks;        // ceil(group / chunk_heads)
  int partition_tokens;   // keys per split-KV partition
  int num_partitions;     // P = ceil(MB * BS / partition_tokens)
  int rows_per_pass;      // query rows a CTA holds per pass over its partition: 4 or 16
  int64_t workspace_floats;  // T * Hq * P * (Dv + 2): partial outputs, then maxima, then sums
};

inline PagedAttentionPlan paged_attention_plan(int num_tokens, int num_seqs, int max_blocks,
                                               int block_size, int num_q_heads, int num_kv_heads,
                                               int head_dim_v) {
  PagedAttentionPlan plan;
  const int group = num_q_heads / num_kv_heads;
  plan.chunk_heads = group < kAttnMaxRows ? group : kAttnMaxRows;
  plan.head_chunks = (group + plan.chunk_heads - 1) / plan.chunk_heads;
  const int max_tokens = max_blocks * block_size;
  plan.partition_tokens = choose_partition_tokens(
      static_cast<int64_t>(num_seqs) * num_kv_heads * plan.head_chunks, max_tokens);
  plan.num_partitions = num_partitions(max_tokens, plan.partition_tokens);
  if (plan.num_partitions < 1) plan.num_partitions = 1;
  plan.workspace_floats = static_cast<int64_t>(num_tokens) * num_q_heads * plan.num_partitions *
                          (head_dim_v + 2);
  // Rows a CTA meets: its heads x the sequence's q_len. Only T / B (the mean q_len) is known from
  // shapes; with T <= B (decode, the CUDA-graph buckets) a GQA-4 group fits the lighter 4-row kernel,
  // which keeps 3 CTAs per SM. Either kernel is correct for any q_len (more rows = more passes).
  const int64_t mean_q = num_seqs > 0 ? (num_tokens + num_seqs - 1) / num_seqs : 1;
  plan.rows_per_pass = plan.chunk_heads * mean_q <= 4 && head_dim_v <= 128 ? 4 : kAttnMaxRows;
  return plan;
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
