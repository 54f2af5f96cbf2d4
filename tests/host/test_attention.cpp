// Host-side checks of cuda/attention.cuh: the split-KV softmax algebra and the block addressing the
// paged-attention kernel uses. Built with g++ and run by tests/test_host_helpers.py (exit 0 = pass).
// References are independent: a double-precision softmax over the whole key range, and addresses
// computed by walking an explicit (block, offset, head, dim) index of a strided tensor.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "attention.cuh"

using namespace tinyinfer;

static int failures = 0;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond) && ++failures <= 20) std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_NEAR(actual, expected, tol)                                                         \
  do {                                                                                            \
    const double a_ = (actual), e_ = (expected);                                                  \
    if (!(std::fabs(a_ - e_) <= (tol)) && ++failures <= 20)                                       \
      std::printf("FAIL %s:%d: %s = %.9g, expected %.9g\n", __FILE__, __LINE__, #actual, a_, e_); \
  } while (0)

// Key rows of a shuffled block table land where an explicit strided index says, for plain caches and
// for MLA's V view (k_cache[..., :512] shares K's strides).
static void test_key_row_offset() {
  std::mt19937 rng(1);
  for (int bs : {8, 16, 32}) {
    const int num_blocks = 40, heads = 3, dim = 576;
    std::vector<int32_t> table(num_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    const CacheStrides st{int64_t(bs) * heads * dim, int64_t(heads) * dim, dim};
    for (int pos = 0; pos < num_blocks * bs; pos += 7) {
      for (int h = 0; h < heads; ++h) {
        const int64_t block = table[pos / bs], offset = pos % bs;
        const int64_t expected = ((block * bs + offset) * heads + h) * dim;  // contiguous (NB, BS, H, D)
        CHECK(key_row_offset(table.data(), pos, bs, st, h) == expected);
      }
    }
  }
}

// The kernel reads only table entries [0, blocks_for_tokens(seq_len)): check the last position's entry.
static void test_last_position_reads_last_owned_block() {
  for (int bs : {8, 16, 32}) {
    for (int len = 1; len < 200; ++len) {
      const int last_entry = (len - 1) / bs;
      CHECK(last_entry == blocks_for_tokens(len, bs) - 1);
    }
  }
}

static void test_rescale_factor() {
  CHECK(rescale_factor(-INFINITY, -INFINITY) == 0.0f);  // empty sum stays empty, no NaN
  CHECK(rescale_factor(-INFINITY, 3.0f) == 0.0f);
  CHECK_NEAR(rescale_factor(2.0f, 2.0f), 1.0, 0);
  CHECK_NEAR(rescale_factor(1.0f, 3.0f), 0.25, 1e-7);
}

static void test_lse_merge_of_empties() {
  LseState e = lse_merge(lse_empty(), lse_empty());
  CHECK(e.m == -INFINITY && e.l == 0.0f);
  LseState x{1.5f, 2.0f};
  LseState a = lse_merge(x, lse_empty()), b = lse_merge(lse_empty(), x);
  CHECK(a.m == x.m && a.l == x.l && b.m == x.m && b.l == x.l);
  CHECK(lse_weight(0.0f, lse_empty()) == 0.0f);  // every key masked: zero output, not NaN
}

// Partition random scores (log2 units) with some partitions fully masked; merging per-partition
// (max, sum, unnormalised output) must equal one softmax over all keys, computed in double.
static void test_split_softmax_equals_full_softmax() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int keys = 1 + trial * 13 % 500, part = 1 + trial % 64;
    std::vector<float> s(keys), v(keys);
    std::vector<bool> visible(keys);
    for (int j = 0; j < keys; ++j) {
      s[j] = normal(rng);
      v[j] = normal(rng);
      visible[j] = j == 0 || (trial % 3 != 0) || (j / part) % 2 == 0;  // whole partitions masked
    }
    double ref_max = -INFINITY, ref_den = 0, ref_num = 0;
    for (int j = 0; j < keys; ++j) if (visible[j]) ref_max = std::max(ref_max, double(s[j]));
    for (int j = 0; j < keys; ++j) {
      if (!visible[j]) continue;
      double w = std::exp2(double(s[j]) - ref_max);
      ref_den += w;
      ref_num += w * v[j];
    }
    const int parts = attn_live_partitions(keys, part);
    std::vector<float> m(parts), l(parts), o(parts);
    for (int p = 0; p < parts; ++p) {  // what one split CTA computes (online, tile by tile of 4 keys)
      float mp = -INFINITY, lp = 0, op = 0;
      for (int j0 = p * part; j0 < std::min(keys, (p + 1) * part); j0 += 4) {
        float tmax = -INFINITY;
        for (int j = j0; j < std::min({keys, (p + 1) * part, j0 + 4}); ++j)
          if (visible[j]) tmax = std::max(tmax, s[j]);
        float mnew = std::max(mp, tmax), alpha = rescale_factor(mp, mnew);
        lp *= alpha;
        op *= alpha;
        for (int j = j0; j < std::min({keys, (p + 1) * part, j0 + 4}); ++j) {
          float pr = (!visible[j] || mnew == -INFINITY) ? 0.0f : std::exp2(s[j] - mnew);
          lp += pr;
          op += pr * v[j];
        }
        mp = mnew;
      }
      m[p] = mp; l[p] = lp; o[p] = op;
    }
    LseState total = lse_empty();
    for (int p = 0; p < parts; ++p) total = lse_merge(total, {m[p], l[p]});
    double out = 0;
    for (int p = 0; p < parts; ++p) out += lse_weight(m[p], total) * o[p];
    CHECK(std::isfinite(out));
    CHECK_NEAR(out, ref_num / ref_den, 1e-4 * (1 + std::fabs(ref_num / ref_den)));
    CHECK_NEAR(total.m, ref_max, 0);
  }
}

// Shapes-only args for the plan functions (pointers unused).
static PagedAttentionArgs shapes(int T, int B, int MB, int BS, int hq, int hkv, int d, int dv) {
  PagedAttentionArgs a{};
  a.num_tokens = T; a.num_seqs = B; a.max_blocks = MB; a.block_size = BS;
  a.num_q_heads = hq; a.num_kv_heads = hkv; a.head_dim = d; a.head_dim_v = dv;
  return a;
}

// The partitions of the actual length cover every key exactly once, in whole tiles, none shorter than
// the minimum unless the sequence is, and never more than the planned number of splits.
static void test_partitions_cover_the_sequence() {
  for (int L : {1, 15, 16, 17, 255, 256, 257, 1000, 4096, 32768})
    for (int splits : {1, 2, 3, 33, 128})
      for (int tile : {32, 64})
        for (int min_chunk : {16, 256}) {
          const int part = attn_partition_keys(L, splits, tile, min_chunk), live = attn_live_partitions(L, part);
          CHECK(part >= min_chunk && (part % tile == 0 || part == min_chunk));
          CHECK(live >= 1 && live <= splits);
          CHECK(int64_t(live) * part >= L && int64_t(live - 1) * part < L);  // covered; the last one non-empty
        }
}

// The plan: decode and verify shapes of the benchmark, MLA, the empty batch; splits fill the slots once.
static void test_plan() {
  const int slots = 132 * 2;
  // batch 1, 32k context, GQA 32/8: one m-tile of 4 heads, 33 partitions over 8 KV heads.
  PagedAttentionArgs a1 = shapes(1, 1, 2048, 16, 32, 8, 128, 128);
  PagedAttentionPlan p1 = attn_plan_shapes(a1, 256);
  attn_plan_splits(a1, slots, 1.0f, &p1);
  CHECK(p1.chunk_heads == 4 && p1.head_chunks == 1 && p1.m_tiles == 1);
  CHECK(p1.num_splits == 33 && p1.workspace_floats == int64_t(1) * 32 * 33 * 130);
  // batch 32, 4k: 256 CTAs already fill the slots: one partition, no workspace, no merge.
  PagedAttentionArgs a2 = shapes(32, 32, 256, 16, 32, 8, 128, 128);
  PagedAttentionPlan p2 = attn_plan_shapes(a2, 256);
  attn_plan_splits(a2, slots, 1.0f, &p2);
  CHECK(p2.num_splits == 1 && p2.workspace_floats == 0);
  // q_len 4 (verify) of a GQA-4 group: 16 rows, still one m-tile; q_len 16: 64 rows, four.
  CHECK(attn_plan_shapes(shapes(128, 32, 256, 16, 32, 8, 128, 128), 256).m_tiles == 1);
  CHECK(attn_plan_shapes(shapes(80, 16, 256, 16, 32, 8, 128, 128), 256).m_tiles == 2);
  CHECK(attn_plan_shapes(shapes(512, 32, 256, 16, 32, 8, 128, 128), 256).m_tiles == 4);
  // MLA: 128 heads over one latent head -> 4 chunks of 32 heads, at most two m-tiles.
  PagedAttentionPlan p3 = attn_plan_shapes(shapes(4, 4, 64, 16, 128, 1, 576, 512), 256);
  CHECK(p3.chunk_heads == 32 && p3.head_chunks == 4 && p3.m_tiles == 2);
  // Short tables cap the splits (no partition below the minimum at the table's full width).
  PagedAttentionArgs a4 = shapes(1, 1, 8, 16, 32, 8, 128, 128);
  PagedAttentionPlan p4 = attn_plan_shapes(a4, 256);
  attn_plan_splits(a4, slots, 1.0f, &p4);
  CHECK(p4.num_splits == 1);
  PagedAttentionArgs a5 = shapes(0, 0, 0, 16, 8, 8, 64, 64);
  PagedAttentionPlan p5 = attn_plan_shapes(a5, 256);
  attn_plan_splits(a5, slots, 1.0f, &p5);
  CHECK(p5.num_splits == 1 && p5.workspace_floats == 0);
}

// Shared memory of the shipped tile configurations fits one CTA (227 KiB), regions are 16-byte aligned
// and do not overlap, and the D <= 128 single-m-tile decode kernels fit two CTAs per SM.
static void test_smem_plan() {
  const int sm_bytes = 228 * 1024, per_cta_reserved = 1024, cta_limit = 227 * 1024;
  struct Case { int d, dv, tile, stages, ctas; };
  for (Case c : {Case{64, 64, 64, 4, 2}, Case{128, 128, 64, 3, 2}, Case{576, 512, 32, 2, 1}}) {
    for (int mt = 1; mt <= attn_max_m_tiles(c.d); mt *= 2)
      for (bool alias : {false, true}) {
        const AttnSmemPlan p = attn_smem_plan(c.d, c.dv, c.tile, c.stages, 16 * mt, 2, alias);
        CHECK(p.total_bytes <= cta_limit);
        if (mt == 1) CHECK(c.ctas * (p.total_bytes + per_cta_reserved) <= sm_bytes);
        CHECK(p.v_off % 16 == 0 && p.q_off % 16 == 0 && p.p_off % 16 == 0 && p.f_off % 16 == 0 && p.i_off % 16 == 0);
        CHECK(p.v_off >= c.stages * p.k_stage * 2 && p.q_off >= p.v_off + c.stages * p.v_stage * 2);
        CHECK(p.p_off >= p.q_off + 16 * mt * (c.d + kRowPad) * 2 && p.f_off >= p.p_off + 16 * mt * (c.tile + kRowPad) * 2);
        CHECK(p.total_bytes >= p.i_off + 3 * 16 * mt * 4);
      }
  }
}

static void test_block_size_support() {
  for (int bs : {1, 2, 8, 16, 32, 64}) CHECK(paged_attention_supports_block_size(bs));
  for (int bs : {0, -16, 3, 12, 24}) CHECK(!paged_attention_supports_block_size(bs));
  CHECK(log2_if_power_of_two(16) == 4 && log2_if_power_of_two(12) == -1);
}

int main() {
  test_key_row_offset();
  test_last_position_reads_last_owned_block();
  test_rescale_factor();
  test_lse_merge_of_empties();
  test_split_softmax_equals_full_softmax();
  test_partitions_cover_the_sequence();
  test_plan();
  test_smem_plan();
  test_block_size_support();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("attention.cuh: all checks passed\n");
  return 0;
}
