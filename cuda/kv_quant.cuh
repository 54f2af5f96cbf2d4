// kv_quant.cuh -- the quantized KV cache's element formats on the GPU (tinyinfer/ops/kv_quant.py states the
// arithmetic; docs/kv-cache.md why): int8 or fp8 e4m3 rows, each with a float16 scale per (token, head). Free of CUDA runtime calls, so tests/host/emulate_kv_quant.cpp runs this
// very code on the CPU:
//   * fp8_e4m3_encode / fp8_e4m3_decode: e4m3fn (Micikevicius et al., 2022) from its bit layout, round to
//     nearest even, subnormals kept -- torch's float8_e4m3fn cast for the clamped values the write makes;
//   * quantize_kv_row: one row of the K/V write (the reference's float32 steps in order);
//   * dequantize8: 8 cache bytes times their scale into 8 values of the attention's dtype (the paged-
//     attention kernel's tile load for a quantized cache, cuda/paged_attention.cuh).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.cuh"  // also defines __host__ / __device__ away for g++ (bindings.cpp: the params only)

namespace tinyinfer {

enum KVQuant : int { kKVNone = 0, kKVInt8 = 1, kKVFp8 = 2 };

// The K/V write into a quantized cache: one (token, K-or-V, head) row per thread.
struct StoreKVQuantParams {
  const void* src[2];           // k (T, H, D), v (T, H, Dv) or nullptr (MLA), model dtype
  int64_t src_token_stride[2], src_head_stride[2];
  uint8_t* cache[2];            // (NB, BS, H, D|Dv) int8 / fp8 bytes
  CacheStrides cache_strides[2];
  void* scale[2];               // float16 (NB, BS, H); element strides below
  int64_t scale_strides[2][3];  // block, offset, head
  int64_t width[2];             // D, Dv
  const int64_t* slot_mapping;  // (T,), -1 = padding
  int64_t num_tokens, num_heads, num_blocks, block_size;
  int kind;                     // kKVInt8 / kKVFp8
};

}  // namespace tinyinfer

#if defined(__CUDACC__) || defined(TINYINFER_EMULATE)
#include "ptx.cuh"  // element conversions (to_float / from_float)

namespace tinyinfer {

// Raw float bits both ways: intrinsics on the GPU, memcpy in host code (bindings.cpp, the emulator).
__device__ inline uint32_t kvq_float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
__device__ inline float kvq_bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// e4m3fn byte -> float: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
// (m x 2^-9); 0x7F / 0xFF are NaN (no infinities).
__device__ inline float fp8_e4m3_decode(uint8_t c) {
  const uint32_t e = (c >> 3) & 15, m = c & 7, sign = static_cast<uint32_t>(c & 0x80) << 24;
  if (e == 15 && m == 7) return kvq_bits_float(0x7fc00000u | sign);
  if (e == 0) return kvq_bits_float(kvq_float_bits(static_cast<float>(m) * (1.f / 512)) | sign);
  return kvq_bits_float(sign | ((e + 120) << 23) | (m << 20));   // 2^(e - 7) x 1.m
}

// float with |x| <= 448 (the write clamps first) -> e4m3fn byte, round to nearest even; NaN -> 0x7F.
__device__ inline uint8_t fp8_e4m3_encode(float x) {
  if (x != x) return 0x7f;
  const uint32_t bits = kvq_float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const float a = fminf(fabsf(x), 448.f);
  if (a < 0.015625f) return sign | static_cast<uint8_t>(rintf(a * 512.f));   // subnormal (8 -> 2^-6)
  uint32_t ab = kvq_float_bits(a);
  ab += 0x7ffffu + ((ab >> 20) & 1);                                         // round 23 -> 3 bits, RNE
  return sign | static_cast<uint8_t>((((ab >> 23) - 120) << 3) | ((ab >> 20) & 7));
}

// One row x[0..n) (stride 1, type T) into q[0..n), its scale written to *scale (amax / 127 for int8,
// / 448 for fp8, as float16, at least 2^-14). x / s rounds half to even (rintf).
template <typename T>
__device__ inline void quantize_kv_row(const T* x, uint8_t* q, int64_t n, __half* scale, int kind) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = fmaxf(amax, fabsf(to_float(x[i])));
  const float qmax = kind == kKVInt8 ? 127.f : 448.f;
  const __half s = __float2half_rn(fminf(fmaxf(amax / qmax, 6.103515625e-05f), 65504.f));
  *scale = s;
  const float sf = __half2float(s);
  if (kind == kKVInt8) {
    for (int64_t i = 0; i < n; ++i)
      q[i] = static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(rintf(to_float(x[i]) / sf), -127.f), 127.f)));
  } else {
    for (int64_t i = 0; i < n; ++i) q[i] = fp8_e4m3_encode(fminf(fmaxf(to_float(x[i]) / sf, -448.f), 448.f));
  }
}

// 8 quantized values at src (8-byte aligned) times s -> 8 values of T at dst (16-byte aligned); zeros
// when !valid (a key past the partition, never read from the cache).
template <typename T>
__device__ inline void dequantize8(const uint8_t* src, float s, int kind, bool valid, T* dst) {
  uint2 raw = {0u, 0u};
  if (valid) raw = *reinterpret_cast<const uint2*>(src);
  T vals[8];
  for (int i = 0; i < 8; ++i) {
    const uint8_t c = static_cast<uint8_t>(((i < 4 ? raw.x : raw.y) >> (8 * (i & 3))) & 0xff);
    const float f = kind == kKVInt8 ? static_cast<float>(static_cast<int8_t>(c)) : fp8_e4m3_decode(c);
    vals[i] = from_float<T>(valid ? f * s : 0.f);
  }
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
}

// One 16-byte chunk of a paged-attention tile from a quantized cache: row (blk, off, head) of `cache` (byte
// strides cs) from column col, times the float16 scale at ss; zeros when !valid.
template <typename T>
__device__ inline void dequantize_chunk(const void* cache, const CacheStrides& cs, const void* scale,
                                        const CacheStrides& ss, int64_t blk, int64_t off, int64_t head, int col,
                                        int kind, bool valid, T* dst) {
  const float s = valid ? to_float(static_cast<const __half*>(scale)[cache_row_start(ss, blk, off, head)]) : 0.f;
  dequantize8<T>(static_cast<const uint8_t*>(cache) + cache_row_start(cs, blk, off, head) + col, s, kind, valid, dst);
}


template <typename T>
__device__ inline void store_kv_quant_row(const StoreKVQuantParams& p, int64_t row) {
  const int64_t t = row / (2 * p.num_heads), which = row / p.num_heads % 2, h = row % p.num_heads;
  if (t >= p.num_tokens || p.src[which] == nullptr) return;
  const int64_t slot = p.slot_mapping[t];
  if (!slot_is_writable(slot, p.num_blocks, p.block_size)) return;
  const SlotAddress a = slot_to_address(slot, p.block_size);
  const int64_t* ss = p.scale_strides[which];
  quantize_kv_row<T>(static_cast<const T*>(p.src[which]) + t * p.src_token_stride[which] + h * p.src_head_stride[which],
                     p.cache[which] + cache_row_start(p.cache_strides[which], a.block, a.offset, h), p.width[which],
                     static_cast<__half*>(p.scale[which]) + a.block * ss[0] + a.offset * ss[1] + h * ss[2], p.kind);
}

}  // namespace tinyinfer
#endif  // __CUDACC__ || TINYINFER_EMULATE
