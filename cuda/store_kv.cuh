// store_kv.cuh -- the per-token body of the store_kv kernel (cuda/store_kv.cu), kept free of CUDA
// runtime calls so tests/host/test_store_kv.cpp runs the very code the GPU runs, on the CPU.
//
// The copy is dtype-agnostic: by the time it runs, K/V already have the cache's dtype, so a row of
// head_dim values is just row_words words of sizeof(Word) bytes (16 bytes when everything is aligned).
#pragma once

#include "common.cuh"

namespace tinyinfer {

// All sizes and strides are in words of the width the launcher picked (see common_vector_bytes).
struct StoreKVParams {
  const void* k;              // (T, Hkv, D) rows of the new keys
  const void* v;              // (T, Hkv, Dv) or nullptr (MLA: the latent row is all of K)
  void* k_cache;              // (NB, BS, Hkv, D)
  void* v_cache;              // (NB, BS, Hkv, Dv) or nullptr
  const int64_t* slot_mapping;  // (T,) slot of each token, -1 = padding
  int64_t num_tokens;         // T
  int64_t num_heads;          // Hkv
  int64_t num_blocks;         // NB
  int64_t block_size;         // BS
  int64_t k_row_words;        // D * elem_size / word
  int64_t v_row_words;        // Dv * elem_size / word
  int64_t k_token_stride, k_head_stride;  // source strides
  int64_t v_token_stride, v_head_stride;
  CacheStrides k_cache_strides;
  CacheStrides v_cache_strides;
};

// Copy one tensor's Hkv rows of token t into the cache rows at addr. Lanes split the Hkv * row_words
// words among themselves (lane = threadIdx.x, num_lanes = blockDim.x on the GPU); consecutive lanes
// touch consecutive words, so each warp's loads and stores coalesce.
template <typename Word>
__host__ __device__ inline void store_rows(const Word* src, int64_t token_stride, int64_t head_stride,
                                           Word* cache, const CacheStrides& cs, int64_t t,
                                           SlotAddress addr, int64_t num_heads, int64_t row_words,
                                           int64_t lane, int64_t num_lanes) {
  const int64_t total = num_heads * row_words;
  for (int64_t i = lane; i < total; i += num_lanes) {
    const int64_t head = i / row_words, w = i % row_words;
    cache[cache_row_start(cs, addr.block, addr.offset, head) + w] =
        src[t * token_stride + head * head_stride + w];
  }
}

// Everything one token needs: look up its slot, skip padding, copy its K (and V) rows.
template <typename Word>
__host__ __device__ inline void store_kv_token(const StoreKVParams& p, int64_t t, int64_t lane,
                                               int64_t num_lanes) {
  const int64_t slot = p.slot_mapping[t];
  if (!slot_is_writable(slot, p.num_blocks, p.block_size)) return;
  const SlotAddress addr = slot_to_address(slot, p.block_size);
  store_rows(static_cast<const Word*>(p.k), p.k_token_stride, p.k_head_stride,
             static_cast<Word*>(p.k_cache), p.k_cache_strides, t, addr, p.num_heads, p.k_row_words,
             lane, num_lanes);
  if (p.v != nullptr) {
    store_rows(static_cast<const Word*>(p.v), p.v_token_stride, p.v_head_stride,
               static_cast<Word*>(p.v_cache), p.v_cache_strides, t, addr, p.num_heads, p.v_row_words,
               lane, num_lanes);
  }
}

}  // namespace tinyinfer
