// common.cuh -- index math every tinyinfer kernel shares: where a token lives in the paged KV cache.
//
// The paged cache (see docs/architecture.md, "KV layout") stores each layer as
//     cache[num_blocks, block_size, n_kv_heads, head_dim]     (any strides; last dim unit-stride)
// A *slot* is a flat index over (block, offset): slot = block * block_size + offset; slot -1 means
// "padding, skip". A sequence's *block table* lists its physical blocks, so its position p lives in
// block table[p / block_size] at offset p % block_size.
//
// Everything here is `__host__ __device__` and free of CUDA runtime calls, so g++ compiles it too:
// tests/host/test_common.cpp checks this arithmetic on the CPU in CI.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef __CUDACC__
// Plain C++ (g++ host tests, bindings.cpp): the CUDA qualifiers mean nothing.
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#endif

namespace tinyinfer {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Slots and block tables
// ---------------------------------------------------------------------------------------------

struct SlotAddress {
  int64_t block;   // physical block id, 0 .. num_blocks-1
  int64_t offset;  // row inside the block, 0 .. block_size-1
};

// slot -> (block, offset). Only meaningful for slot >= 0 (callers skip padding first).
__host__ __device__ inline SlotAddress slot_to_address(int64_t slot, int64_t block_size) {
  return SlotAddress{slot / block_size, slot % block_size};
}

// A slot a kernel may write: not padding (-1) and inside the cache. Out-of-range slots are a caller
// bug; kernels skip them rather than write out of bounds (the reference raises an IndexError).
__host__ __device__ inline bool slot_is_writable(int64_t slot, int64_t num_blocks, int64_t block_size) {
  return slot >= 0 && slot < num_blocks * block_size;
}

// Number of blocks a sequence of seq_len tokens occupies; block-table entries past this are never read.
__host__ __device__ inline int64_t blocks_for_tokens(int64_t seq_len, int64_t block_size) {
  return ceil_div(seq_len, block_size);
}

// Position p of one sequence -> its slot, through that sequence's row of the block table.
__host__ __device__ inline int64_t position_to_slot(const int32_t* block_table_row, int64_t pos,
                                                    int64_t block_size) {
  return static_cast<int64_t>(block_table_row[pos / block_size]) * block_size + pos % block_size;
}

// Query i (0-based) of a sequence with q_len new queries and seq_len cached tokens (queries included)
// sits at this position; it attends causally to keys 0 .. that position.
__host__ __device__ inline int64_t query_position(int64_t seq_len, int64_t q_len, int64_t i) {
  return seq_len - q_len + i;
}

// Which sequence owns flat query row t: the b with query_start_loc[b] <= t < query_start_loc[b+1].
// query_start_loc has num_seqs + 1 non-decreasing entries; rows at or past query_start_loc[num_seqs]
// are padding and give -1. Binary search, so a kernel can map its row without a host-side table.
__host__ __device__ inline int64_t sequence_of_row(const int32_t* query_start_loc, int64_t num_seqs,
                                                   int64_t t) {
  if (t < query_start_loc[0] || t >= query_start_loc[num_seqs]) return -1;
  int64_t lo = 0, hi = num_seqs - 1;  // invariant: the answer lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;  // empty sequences (equal neighbours) are skipped: the last start <= t wins
}

// ---------------------------------------------------------------------------------------------
// Strided cache addressing
// ---------------------------------------------------------------------------------------------

// Strides of a 4-D cache [num_blocks, block_size, n_heads, head_dim] in any unit the caller picks
// (elements, bytes, or vector words); the last dimension is unit-stride.
struct CacheStrides {
  int64_t block;
  int64_t offset;
  int64_t head;
};

// Start of row (block, offset, head) relative to the cache's base, in the strides' unit.
__host__ __device__ inline int64_t cache_row_start(const CacheStrides& s, int64_t block, int64_t offset,
                                                   int64_t head) {
  return block * s.block + offset * s.offset + head * s.head;
}

// ---------------------------------------------------------------------------------------------
// Vector width for copies
// ---------------------------------------------------------------------------------------------

// Largest power-of-two word size (<= 16 bytes) dividing every quantity given: row lengths and strides
// in bytes and base addresses. A copy may move data in words of this size (16 bytes = one 128-bit
// load/store per thread) only when every row start is aligned to it.
__host__ __device__ inline int64_t common_vector_bytes(const int64_t* quantities, int64_t count) {
  int64_t width = 16;
  for (int64_t i = 0; i < count; ++i) {
    while (width > 1 && quantities[i] % width != 0) width /= 2;
  }
  return width;
}

}  // namespace tinyinfer
