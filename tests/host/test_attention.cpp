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
    const int parts = num_partitions(keys, part);
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

// Launch planning depends on shapes only; check the two benchmark points and MLA.
static void test_plan() {
  // batch 1, 32k context, GQA 32/8, block size 16: 8 KV-head CTAs x 128 partitions of 256 keys.
  PagedAttentionPlan p1 = paged_attention_plan(1, 1, 2048, 16, 32, 8, 128);
  CHECK(p1.chunk_heads == 4 && p1.head_chunks == 1);
  CHECK(p1.partition_tokens == 256 && p1.num_partitions == 128);
  CHECK(p1.workspace_floats == int64_t(1) * 32 * 128 * 130);
  // batch 32, 4k contexts: 2048 CTAs of 512 keys.
  PagedAttentionPlan p2 = paged_attention_plan(32, 32, 256, 16, 32, 8, 128);
  CHECK(p2.partition_tokens == 512 && p2.num_partitions == 8);
  // MLA: 128 query heads over one latent head -> 8 chunks of 16 heads.
  PagedAttentionPlan p3 = paged_attention_plan(4, 4, 64, 16, 128, 1, 512);
  CHECK(p3.chunk_heads == 16 && p3.head_chunks == 8);
  // Partitions are whole tiles for every tile size.
  for (int b : {1, 3, 64, 256})
    for (int mb : {1, 100, 4096}) {
      PagedAttentionPlan p = paged_attention_plan(b, b, mb, 16, 32, 8, 128);
      CHECK(p.partition_tokens % 32 == 0 && p.num_partitions >= 1);
      CHECK(int64_t(p.num_partitions) * p.partition_tokens >= int64_t(mb) * 16);
    }
  PagedAttentionPlan empty = paged_attention_plan(0, 0, 0, 16, 8, 8, 64);
  CHECK(empty.num_partitions == 1 && empty.workspace_floats == 0);
}

// Shared memory fits the residency the kernels are built for (__launch_bounds__): the 4-row decode
// kernel 3 CTAs per SM, the 16-row kernel 2 (D <= 128), MLA 1 even when V is a separate tensor; and
// the output-reduction scratch fits inside the pipeline stages.
static void test_smem_plan() {
  const int sm_bytes = 228 * 1024, per_cta_reserved = 1024, cta_limit = 227 * 1024;
  struct Case { int d, dv, rows, ctas; };
  for (Case c : {Case{64, 64, 4, 3}, Case{64, 64, 16, 2}, Case{128, 128, 4, 3}, Case{128, 128, 16, 2},
                 Case{576, 512, 16, 1}}) {
    for (bool alias : {false, true}) {
      SplitSmemPlan p = split_smem_plan(c.d, c.dv, attn_tile_tokens(c.d), attn_pipeline_stages(c.d),
                                        c.rows, kAttnThreads, 2, alias);
      CHECK(p.total_bytes <= cta_limit);
      CHECK(c.ctas * (p.total_bytes + per_cta_reserved) <= sm_bytes);
      CHECK(p.stage_bytes % 16 == 0);
      int pairs = c.dv / 2, subsets = pairs >= kAttnThreads ? 1 : kAttnThreads / pairs;
      if (subsets > 1) CHECK(subsets * c.rows * c.dv * 4 <= p.stage_bytes);
    }
  }
}

// The 4-row kernel is picked only when shapes say the rows of one CTA usually fit in 4.
static void test_rows_per_pass() {
  CHECK(paged_attention_plan(1, 1, 2048, 16, 32, 8, 128).rows_per_pass == 4);     // bs1 decode, GQA 4
  CHECK(paged_attention_plan(32, 32, 256, 16, 32, 8, 128).rows_per_pass == 4);    // bs32 decode
  CHECK(paged_attention_plan(128, 32, 256, 16, 32, 8, 128).rows_per_pass == 16);  // q_len 4 verify
  CHECK(paged_attention_plan(64, 16, 256, 16, 32, 32, 128).rows_per_pass == 4);   // MHA, q_len 4
  CHECK(paged_attention_plan(8, 8, 256, 16, 16, 1, 128).rows_per_pass == 16);     // MQA group 16
  CHECK(paged_attention_plan(1, 1, 64, 16, 16, 1, 512).rows_per_pass == 16);      // MLA
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
  test_plan();
  test_smem_plan();
  test_rows_per_pass();
  test_block_size_support();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("attention.cuh: all checks passed\n");
  return 0;
}
