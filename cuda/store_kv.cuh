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

// The widest word (16, 8, 4, 2 or 1 bytes) dividing every pointer, row length and stride of a
// byte-unit StoreKVParams (v fields ignored when v is nullptr): the kernel's copy width.
__host__ __device__ inline int64_t store_kv_word_bytes(const StoreKVParams& b) {
  const bool has_v = b.v != nullptr;
  const int64_t quantities[] = {
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.k)),
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.k_cache)),
      b.k_row_words, b.k_token_stride, b.k_head_stride,
      b.k_cache_strides.block, b.k_cache_strides.offset, b.k_cache_strides.head,
      has_v ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.v)) : 0,
      has_v ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.v_cache)) : 0,
      has_v ? b.v_row_words : 0, has_v ? b.v_token_stride : 0, has_v ? b.v_head_stride : 0,
      has_v ? b.v_cache_strides.block : 0, has_v ? b.v_cache_strides.offset : 0,
      has_v ? b.v_cache_strides.head : 0};
  return common_vector_bytes(quantities, sizeof(quantities) / sizeof(quantities[0]));
}

// Byte-unit params -> the same params in words of `word` bytes (word from store_kv_word_bytes).
__host__ __device__ inline StoreKVParams store_kv_in_words(StoreKVParams p, int64_t word) {
  if (p.v == nullptr) p.v_row_words = 0;
  p.k_row_words /= word;
  p.v_row_words /= word;
  p.k_token_stride /= word;
  p.k_head_stride /= word;
  p.v_token_stride /= word;
  p.v_head_stride /= word;
  CacheStrides* caches[] = {&p.k_cache_strides, &p.v_cache_strides};
  for (CacheStrides* s : caches) {
    s->block /= word;
    s->offset /= word;
    s->head /= word;
  }
  return p;
}

// Threads per token: enough whole warps to give each about one word of the token's widest tensor,
// at most 256 (the loop in store_rows covers the rest).
__host__ __device__ inline int64_t store_kv_threads(const StoreKVParams& words) {
  const int64_t widest = words.k_row_words > words.v_row_words ? words.k_row_words : words.v_row_words;
  const int64_t per_token = words.num_heads * widest;
  return per_token >= 256 ? 256 : ceil_div(per_token, 32) * 32;
}

// Thread blocks per token (grid.y): enough that each thread copies about one word, so a decode step
// with few tokens still spreads over many SMs; at most 64 (threads then loop).
__host__ __device__ inline int64_t store_kv_chunks(const StoreKVParams& words, int64_t threads) {
  const int64_t widest = words.k_row_words > words.v_row_words ? words.k_row_words : words.v_row_words;
  const int64_t chunks = ceil_div(words.num_heads * widest, threads);
  return chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
}

// Copy one tensor's Hkv rows of token t into the cache rows at addr. Lanes split the Hkv * row_words
// words among themselves (on the GPU: lane = blockIdx.y * blockDim.x + threadIdx.x over
// gridDim.y * blockDim.x lanes); consecutive lanes touch consecutive words, so each warp's loads and
// stores coalesce.
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
