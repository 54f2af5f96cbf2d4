// rope_store_kv.cu -- rotary position embedding of q and k, fused with the K/V write into the paged
// cache: the attention block's whole "after the QKV projection, before attention" step in one launch.
//
// Computes, for every token t, with (c, s) = the two halves of cos_sin[positions[t]] -- a table of P
// positions computed once per model (row p = [cos(p f_i) a, sin(p f_i) a] for i < D/2, a the
// attention scaling), gathered here instead of computed per step:
//     q_out[t, h] = rope(q[t, h], c, s)                     for the Hq query heads
//     k_out[t, h] = rope(k[t, h], c, s)                     for the Hkv key heads
//     k_cache[slot / BS, slot % BS, h] = k_out[t, h]
//     v_cache[slot / BS, slot % BS, h] = v[t, h]             when slot = slot_mapping[t] >= 0
// with rope(x, c, s) = x * cat(c, c) + rotate_half(x) * cat(s, s) in the Hugging Face layout (dim i
// pairs with i + D/2). Padding tokens (slot -1) are still rotated (their q rows are ignored downstream)
// but never stored; a position outside [0, P) -- a caller bug the kernel cannot report without a host
// sync -- rotates with NaN, so it cannot pass unnoticed. Each product and sum is rounded like the
// reference's separate tensor ops (fused.cuh), so the output is bit for bit the reference's, and the
// same bits as the former kernel that read per-token cos/sin rows equal to the table rows.
//
// Memory layout: q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv) with any token/head strides (the
// model passes views into its fused QKV projection output); cos_sin (P, D) with any row stride;
// positions, slot_mapping (T,) int64;
// caches (NB, BS, Hkv, D|Dv) with any block/offset/head strides; every last dimension unit-stride;
// all tensors share one dtype (fp32, fp16, bf16). q_out, k_out contiguous.
//
// Launch shape: grid (T, ceil(units / 128)), 128 threads, one work unit per thread: a unit rotates
// one 16-byte vector of pairs of one q/k head (the vector at j and the one at j + D/2: both halves
// from the same loads) or copies one 16-byte vector of one V head (fused.cuh, rope_unit). Decode's
// single token is spread over many CTAs, so the step is a few memory latencies long. The grid
// depends only on tensor shapes, so a captured CUDA graph replays it for new positions and slots.
// Misaligned shapes (D/2 or Dv or a stride not a multiple of 16 bytes) use one value per unit.
//
// Build: through tinyinfer/extensions/ (`make build`, or JIT at first use); no torch headers here.
// Host emulation: with TINYINFER_EMULATE defined (tests/host/emulate_rope.cpp) only the kernel compiles.
#ifdef TINYINFER_EMULATE
#include "emulate_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "fused.cuh"

namespace tinyinfer {
namespace {

constexpr int kRopeThreads = 128;

// Nearest value of T, as a float: the rounding a reference tensor op in dtype T applies.
template <typename T>
struct RoundTo {
  __device__ float operator()(float x) const { return to_float(from_float<T>(x)); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ inline Pack<T, N> load(const T* base, int64_t offset) {
  return *reinterpret_cast<const Pack<T, N>*>(base + offset);
}

template <typename T, int N>
__device__ inline void store(T* base, int64_t offset, const Pack<T, N>& value) {
  *reinterpret_cast<Pack<T, N>*>(base + offset) = value;
}

template <typename T, int N>
__global__ void __launch_bounds__(kRopeThreads) rope_store_kv_kernel(const RopeStoreKVParams p) {
  const int64_t t = blockIdx.x;
  const int64_t u = static_cast<int64_t>(blockIdx.y) * kRopeThreads + threadIdx.x;
  const int64_t Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  if (u >= rope_store_units(Hq, Hkv, D, p.head_dim_v, N)) return;
  const RopeUnit unit = rope_unit(u, Hq, Hkv, D, p.head_dim_v, N);
  const int64_t slot = p.slot_mapping[t];
  const bool store_slot = slot_is_writable(slot, p.num_blocks, p.block_size);
  const SlotAddress addr = slot_to_address(store_slot ? slot : 0, p.block_size);

  if (!unit.is_rope) {  // V: a plain copy into the cache
    if (!store_slot) return;
    const Pack<T, N> v = load<T, N>(static_cast<const T*>(p.v),
                                    t * p.v_token_stride + unit.head * p.v_head_stride + unit.column);
    store<T, N>(static_cast<T*>(p.v_cache),
                cache_row_start(p.v_cache_strides, addr.block, addr.offset, unit.head) + unit.column, v);
    return;
  }

  const bool is_q = unit.head < Hq;
  const int64_t head = is_q ? unit.head : unit.head - Hq;
  const T* src = is_q ? static_cast<const T*>(p.q) + t * p.q_token_stride + head * p.q_head_stride
                      : static_cast<const T*>(p.k) + t * p.k_token_stride + head * p.k_head_stride;
  const int64_t j1 = unit.column, j2 = unit.column + D / 2;  // the pair's two halves
  const int64_t pos = p.positions[t];
  const bool pos_ok = pos >= 0 && pos < p.num_positions;
  const T* table_row = static_cast<const T*>(p.cos_sin) + (pos_ok ? pos : 0) * p.cos_sin_stride;
  const Pack<T, N> x1 = load<T, N>(src, j1), x2 = load<T, N>(src, j2);
  const Pack<T, N> c = load<T, N>(table_row, j1), sn = load<T, N>(table_row, j2);  // cos | sin halves
  Pack<T, N> o1, o2;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float cf = pos_ok ? to_float(c.v[i]) : NAN, sf = pos_ok ? to_float(sn.v[i]) : NAN;
    float a, b;
    rope_pair(to_float(x1.v[i]), to_float(x2.v[i]), cf, sf, cf, sf, RoundTo<T>(), &a, &b);
    o1.v[i] = from_float<T>(a);
    o2.v[i] = from_float<T>(b);
  }
  T* out = is_q ? static_cast<T*>(p.q_out) + (t * Hq + head) * D
                : static_cast<T*>(p.k_out) + (t * Hkv + head) * D;
  store<T, N>(out, j1, o1);
  store<T, N>(out, j2, o2);
  if (!is_q && store_slot) {
    T* row = static_cast<T*>(p.k_cache) + cache_row_start(p.k_cache_strides, addr.block, addr.offset, head);
    store<T, N>(row, j1, o1);
    store<T, N>(row, j2, o2);
  }
}

#ifndef TINYINFER_EMULATE
template <typename T, int N>
cudaError_t launch_vectors(const RopeStoreKVParams& p, cudaStream_t stream) {
  const int64_t units = rope_store_units(p.num_q_heads, p.num_kv_heads, p.head_dim, p.head_dim_v, N);
  const dim3 grid(static_cast<unsigned int>(p.num_tokens), static_cast<unsigned int>(ceil_div(units, kRopeThreads)));
  rope_store_kv_kernel<T, N><<<grid, kRopeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const RopeStoreKVParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t es = sizeof(T);
  // Every vector start must be 16-byte aligned: base pointers, strides, and the half-row offset D/2.
  const int64_t quantities[] = {
      reinterpret_cast<int64_t>(p.q), reinterpret_cast<int64_t>(p.k), reinterpret_cast<int64_t>(p.v),
      reinterpret_cast<int64_t>(p.cos_sin),
      reinterpret_cast<int64_t>(p.q_out), reinterpret_cast<int64_t>(p.k_out),
      reinterpret_cast<int64_t>(p.k_cache), reinterpret_cast<int64_t>(p.v_cache),
      p.head_dim / 2 * es, p.head_dim_v * es,
      p.q_token_stride * es, p.q_head_stride * es, p.k_token_stride * es, p.k_head_stride * es,
      p.v_token_stride * es, p.v_head_stride * es, p.cos_sin_stride * es,
      p.k_cache_strides.block * es, p.k_cache_strides.offset * es, p.k_cache_strides.head * es,
      p.v_cache_strides.block * es, p.v_cache_strides.offset * es, p.v_cache_strides.head * es};
  if (common_vector_bytes(quantities, sizeof(quantities) / sizeof(quantities[0])) == 16) {
    return launch_vectors<T, kVec>(p, stream);
  }
  return launch_vectors<T, 1>(p, stream);
}
#endif  // TINYINFER_EMULATE

}  // namespace

#ifndef TINYINFER_EMULATE

// Host launcher: 0 < T < 2^31, D even; strides in elements. Picks 16-byte vectors when aligned.
cudaError_t launch_rope_store_kv(const RopeStoreKVParams& p, FusedDtype dtype, cudaStream_t stream) {
  return launch_for_dtype(dtype, [&](auto t) { return launch_typed<decltype(t)>(p, stream); });
}
#endif  // TINYINFER_EMULATE

}  // namespace tinyinfer
