// Host-side checks of cuda/common.cuh, the paged-cache index math every kernel shares. Built with g++
// and run by tests/test_host_helpers.py; exit status 0 = pass. Expected values come from the layout's
// definition (slot = block * BS + offset; position p in block table[p / BS]) evaluated by brute force.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common.cuh"

using namespace tinyinfer;

static int failures = 0;

#define CHECK_EQ(actual, expected)                                                                 \
  do {                                                                                             \
    const long long a_ = static_cast<long long>(actual), e_ = static_cast<long long>(expected);    \
    if (a_ != e_ && ++failures <= 20)                                                              \
      std::printf("FAIL %s:%d: %s = %lld, expected %lld\n", __FILE__, __LINE__, #actual, a_, e_);  \
  } while (0)

static void test_ceil_div_and_blocks() {
  CHECK_EQ(ceil_div(0, 16), 0);
  CHECK_EQ(ceil_div(1, 16), 1);
  CHECK_EQ(ceil_div(16, 16), 1);
  CHECK_EQ(ceil_div(17, 16), 2);
  for (int64_t bs : {1, 3, 16}) {
    for (int64_t len = 0; len < 100; ++len) {
      int64_t blocks = 0;  // brute force: smallest n with n * bs >= len
      while (blocks * bs < len) ++blocks;
      CHECK_EQ(blocks_for_tokens(len, bs), blocks);
    }
  }
}

static void test_slot_round_trip() {
  for (int64_t bs : {1, 4, 16, 32}) {
    for (int64_t block = 0; block < 7; ++block) {
      for (int64_t offset = 0; offset < bs; ++offset) {
        const SlotAddress a = slot_to_address(block * bs + offset, bs);
        CHECK_EQ(a.block, block);
        CHECK_EQ(a.offset, offset);
      }
    }
  }
  // A slot may address a cache bigger than 2^31 rows without overflowing.
  const int64_t big = (int64_t(1) << 33) + 5;
  CHECK_EQ(slot_to_address(big, 16).block, big / 16);
  CHECK_EQ(slot_to_address(big, 16).offset, 5);
}

static void test_writable_slots() {
  CHECK_EQ(slot_is_writable(-1, 4, 16), false);  // padding
  CHECK_EQ(slot_is_writable(-17, 4, 16), false);
  CHECK_EQ(slot_is_writable(0, 4, 16), true);
  CHECK_EQ(slot_is_writable(63, 4, 16), true);
  CHECK_EQ(slot_is_writable(64, 4, 16), false);  // one past the last row
}

static void test_block_table_walk() {
  const int64_t bs = 4;
  const std::vector<int32_t> table = {7, 2, 9, -1};  // entries past the sequence's blocks hold junk
  for (int64_t pos = 0; pos < 12; ++pos) {
    const int64_t expected = int64_t(table[pos / bs]) * bs + pos % bs;
    CHECK_EQ(position_to_slot(table.data(), pos, bs), expected);
  }
  CHECK_EQ(position_to_slot(table.data(), 0, bs), 28);
  CHECK_EQ(position_to_slot(table.data(), 5, bs), 9);
  CHECK_EQ(position_to_slot(table.data(), 11, bs), 39);
}

static void test_query_positions() {
  // seq_len 10 with 3 new queries: they sit at positions 7, 8, 9.
  CHECK_EQ(query_position(10, 3, 0), 7);
  CHECK_EQ(query_position(10, 3, 2), 9);
  CHECK_EQ(query_position(1, 1, 0), 0);  // first decode step of a 1-token prompt
}

static void test_sequence_of_row() {
  // Sequences of 2, 0 (empty: graph padding), 3, 1 query rows; then padding rows 6, 7.
  const std::vector<int32_t> qsl = {0, 2, 2, 5, 6};
  const int64_t num_seqs = 4;
  for (int64_t t = -1; t < 9; ++t) {
    int64_t expected = -1;  // brute force: the b with qsl[b] <= t < qsl[b+1]
    for (int64_t b = 0; b < num_seqs; ++b)
      if (qsl[b] <= t && t < qsl[b + 1]) expected = b;
    CHECK_EQ(sequence_of_row(qsl.data(), num_seqs, t), expected);
  }
  const std::vector<int32_t> all_empty = {0, 0, 0};
  CHECK_EQ(sequence_of_row(all_empty.data(), 2, 0), -1);
  const std::vector<int32_t> one = {0, 1};
  CHECK_EQ(sequence_of_row(one.data(), 1, 0), 0);
}

static void test_cache_rows() {
  // Contiguous (NB=3, BS=4, H=2, D=8): strides 64, 16, 8.
  const CacheStrides s{64, 16, 8};
  CHECK_EQ(cache_row_start(s, 0, 0, 0), 0);
  CHECK_EQ(cache_row_start(s, 2, 3, 1), 2 * 64 + 3 * 16 + 8);
  // The same storage viewed head-major inside each block (NB, H, BS, D) -> (NB, BS, H, D) view.
  const CacheStrides t{64, 8, 32};
  CHECK_EQ(cache_row_start(t, 1, 2, 1), 64 + 16 + 32);
}

static void test_vector_width() {
  const int64_t aligned[] = {4096, 128, 256, 1 << 20};
  CHECK_EQ(common_vector_bytes(aligned, 4), 16);
  const int64_t eight[] = {4096, 24, 256};
  CHECK_EQ(common_vector_bytes(eight, 3), 8);
  const int64_t two[] = {4096, 128, 10};  // e.g. head_dim 5 in fp16
  CHECK_EQ(common_vector_bytes(two, 3), 2);
  const int64_t odd[] = {4096, 3};
  CHECK_EQ(common_vector_bytes(odd, 2), 1);
  const int64_t zeros[] = {0, 0};  // absent tensors contribute 0, which every width divides
  CHECK_EQ(common_vector_bytes(zeros, 2), 16);
  for (int64_t x = 1; x <= 64; ++x) {  // brute force against the definition
    int64_t expected = 16;
    while (x % expected != 0) expected /= 2;
    const int64_t one[] = {x};
    CHECK_EQ(common_vector_bytes(one, 1), expected);
  }
}

int main() {
  test_ceil_div_and_blocks();
  test_slot_round_trip();
  test_writable_slots();
  test_block_table_walk();
  test_query_positions();
  test_sequence_of_row();
  test_cache_rows();
  test_vector_width();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("common.cuh: all checks passed\n");
  return 0;
}
