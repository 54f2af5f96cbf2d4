// store_kv.cu -- write the new tokens' K/V rows into their slots of the paged KV cache.
//
// Computes: for every token t with slot = slot_mapping[t] >= 0,
//     k_cache[slot / BS, slot % BS, h, :] = k[t, h, :]      (and the same for v / v_cache)
// for all kv heads h. Slot -1 is padding (CUDA-graph batches, speculative rollbacks) and is skipped;
// MLA passes v = v_cache = nullptr because its latent row is the whole of K.
//
// Memory layout: k (T, Hkv, D) and v (T, Hkv, Dv) with any token/head strides; caches
// (NB, BS, Hkv, D|Dv) with any block/offset/head strides (a cache may be a strided view). Every
// last dimension is unit-stride and K/V already have the cache's dtype (bindings.cpp checks and
// converts), so the copy moves raw words and works for fp16, bf16 and fp32 alike.
//
// Launch shape: one thread block per token (grid = T); its threads stride over the Hkv * row words of
// K, then of V. A word is 16 bytes (one 128-bit load/store per thread) whenever every row start,
// stride and base pointer is 16-byte aligned -- the common case, e.g. head_dim 64 in bf16 is 8 words
// -- else the widest of 8/4/2/1 bytes that is. The launch shape depends only on T, so a captured
// CUDA graph replays correctly for new slot values. Pure bandwidth: 2 bytes moved per byte stored.
//
// Build: through tinyinfer/kernels.py (`make build`, or JIT at first use); no torch headers here.
#include <cuda_runtime.h>

#include "common.cuh"
#include "store_kv.cuh"

namespace tinyinfer {

template <typename Word>
__global__ void store_kv_kernel(const StoreKVParams p) {
  store_kv_token<Word>(p, blockIdx.x, threadIdx.x, blockDim.x);
}

// Rescale a byte-unit StoreKVParams to words of `word` bytes (all quantities divisible by it).
static StoreKVParams in_words(StoreKVParams p, int64_t word) {
  p.k_row_words /= word;
  p.v_row_words /= word;
  p.k_token_stride /= word;
  p.k_head_stride /= word;
  p.v_token_stride /= word;
  p.v_head_stride /= word;
  for (CacheStrides* s : {&p.k_cache_strides, &p.v_cache_strides}) {
    s->block /= word;
    s->offset /= word;
    s->head /= word;
  }
  return p;
}

template <typename Word>
static cudaError_t launch_words(const StoreKVParams& bytes, cudaStream_t stream) {
  const StoreKVParams p = in_words(bytes, sizeof(Word));
  const int64_t widest_row = p.num_heads * (p.k_row_words > p.v_row_words ? p.k_row_words : p.v_row_words);
  // Enough whole warps to give each thread about one word of the token; at most 256 threads.
  const int64_t threads = widest_row >= 256 ? 256 : ceil_div(widest_row, 32) * 32;
  store_kv_kernel<Word><<<static_cast<unsigned int>(p.num_tokens), static_cast<unsigned int>(threads),
                          0, stream>>>(p);
  return cudaGetLastError();
}

// Host launcher. `bytes` holds every row length and stride in BYTES (v fields ignored when v is
// nullptr); T must be > 0 and < 2^31. Picks the widest word that keeps all accesses aligned.
cudaError_t launch_store_kv(const StoreKVParams& bytes, cudaStream_t stream) {
  const bool has_v = bytes.v != nullptr;
  const int64_t quantities[] = {
      reinterpret_cast<int64_t>(bytes.k), reinterpret_cast<int64_t>(bytes.k_cache),
      bytes.k_row_words, bytes.k_token_stride, bytes.k_head_stride,
      bytes.k_cache_strides.block, bytes.k_cache_strides.offset, bytes.k_cache_strides.head,
      has_v ? reinterpret_cast<int64_t>(bytes.v) : 0, has_v ? reinterpret_cast<int64_t>(bytes.v_cache) : 0,
      has_v ? bytes.v_row_words : 0, has_v ? bytes.v_token_stride : 0, has_v ? bytes.v_head_stride : 0,
      has_v ? bytes.v_cache_strides.block : 0, has_v ? bytes.v_cache_strides.offset : 0,
      has_v ? bytes.v_cache_strides.head : 0};
  StoreKVParams b = bytes;
  if (!has_v) b.v_row_words = 0;
  switch (common_vector_bytes(quantities, sizeof(quantities) / sizeof(quantities[0]))) {
    case 16: return launch_words<uint4>(b, stream);
    case 8: return launch_words<uint2>(b, stream);
    case 4: return launch_words<uint32_t>(b, stream);
    case 2: return launch_words<uint16_t>(b, stream);
    default: return launch_words<uint8_t>(b, stream);
  }
}

}  // namespace tinyinfer
