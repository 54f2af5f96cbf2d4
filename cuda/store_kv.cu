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
// Launch shape: grid (T, chunks), block <= 256 threads: the chunks x threads lanes of a token stride
// over its Hkv * row words of K, then of V (chunks spreads a small decode batch over more SMs). A word
// is 16 bytes (one 128-bit load/store per thread) whenever every row start, stride and base pointer
// is 16-byte aligned -- the common case, e.g. head_dim 64 in bf16 is 8 words -- else the widest of
// 8/4/2/1 bytes that is. The launch shape depends only on T, so a captured
// CUDA graph replays correctly for new slot values. Pure bandwidth: 2 bytes moved per byte stored.
//
// Build: through tinyinfer/extensions/ (`make build`, or JIT at first use); no torch headers here.
#include <cuda_runtime.h>

#include "common.cuh"
#include "store_kv.cuh"

namespace tinyinfer {

template <typename Word>
__global__ void store_kv_kernel(const StoreKVParams p) {
  store_kv_token<Word>(p, blockIdx.x, int64_t(blockIdx.y) * blockDim.x + threadIdx.x,
                       int64_t(gridDim.y) * blockDim.x);
}

template <typename Word>
static cudaError_t launch_words(const StoreKVParams& bytes, cudaStream_t stream) {
  const StoreKVParams p = store_kv_in_words(bytes, sizeof(Word));
  const int64_t threads = store_kv_threads(p);
  const dim3 grid(static_cast<unsigned int>(p.num_tokens), static_cast<unsigned int>(store_kv_chunks(p, threads)));
  store_kv_kernel<Word><<<grid, static_cast<unsigned int>(threads), 0, stream>>>(p);
  return cudaGetLastError();
}

// Host launcher. `bytes` holds every row length and stride in BYTES (v fields ignored when v is
// nullptr); T must be > 0 and < 2^31. Picks the widest word that keeps all accesses aligned.
cudaError_t launch_store_kv(const StoreKVParams& bytes, cudaStream_t stream) {
  switch (store_kv_word_bytes(bytes)) {
    case 16: return launch_words<uint4>(bytes, stream);
    case 8: return launch_words<uint2>(bytes, stream);
    case 4: return launch_words<uint32_t>(bytes, stream);
    case 2: return launch_words<uint16_t>(bytes, stream);
    default: return launch_words<uint8_t>(bytes, stream);
  }
}

}  // namespace tinyinfer
