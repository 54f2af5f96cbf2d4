// int4.cuh -- the part of the INT4 kernels most likely to be subtly wrong, as plain integer functions:
// which weight each nibble of the packed layout holds, and the bit tricks that turn nibbles into
// fp16/bf16 values without an int->float conversion per element. `__host__ __device__` and free of
// CUDA types, so tests/host/test_int4.cpp checks every nibble value at every position on the CPU.
//
// Kernel layout (tinyinfer/ops/int4_format.py builds it): W (N x K) is cut into tiles of 16 rows x 64 columns;
// tile (nt, kb) is 32 lanes x 4 int32 words, 512 contiguous bytes, so a warp reads it with one
// 16-byte load per lane. Word j of lane l feeds that lane's A operand of one tensor-core
// `mma.m16n8k16` (A = 16 rows of W x 16 k, B = 16 k x 8 activation rows):
//
//   nibble i of word j of lane l (g = l / 4, t = l % 4) is the weight at
//     row = g + 8 * (i & 1)                                                       (nibble_row)
//     k   = 32 * (j >> 1) + 8 * t + 4 * (j & 1) + 2 * ((i >> 1) & 1) + (i >> 2)  (nibble_k)
//
// The mma sums over its 16 k slots in any order, so the slots are mapped onto columns such that
// (a) lane t's B operand for the whole tile is two contiguous 16-byte runs of x, k in [8t, 8t + 8)
// and [32 + 8t, 32 + 8t + 8): x is loaded with two 16-byte loads and used as is; and
// (b) words 0-1 only touch k < 32 and words 2-3 only k >= 32, so no mma straddles a group of 32.
//
// A register r (0..3) of the mma's A fragment holds rows (g, g+8, g, g+8)[r] and the two nibbles
// r and r + 4 in its low and high halves. fp16: OR-ing a nibble q into the mantissa of 1024.0 (0x6400)
// gives the half 1024 + q exactly; nibbles 1, 3 (and 5, 7) sit 4 bits higher and give 1024 + 16 q,
// undone by an fma with 1/16. One LOP3 + one half2 add/fma yields two values q - z. bf16 has only
// 7 mantissa bits: 128.0 (0x4300) + q, each register its own shift.
#pragma once

#include <cstdint>

#include "common.cuh"  // defines __host__ / __device__ away for g++

namespace tinyinfer {
namespace int4 {

constexpr int kTileN = 16;           // rows per tile (the mma's M dimension, used for W's N)
constexpr int kTileK = 64;           // columns per tile: 4 words x 16 k
constexpr int kWordsPerLane = 4;     // one 16-byte load

// --- which weight a nibble holds (relative to the tile's first row and column) -----------------

__host__ __device__ inline int nibble_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }

__host__ __device__ inline int nibble_k(int lane, int j, int i) {
  return 32 * (j >> 1) + 8 * (lane & 3) + 4 * (j & 1) + 2 * ((i >> 1) & 1) + (i >> 2);
}

// Column of x (relative to the tile) of element e (0..7) of the lane's 16-byte x load `half` (0, 1).
// Word j = 2 * half + e / 4 multiplies it: B register (e / 2) % 2, low/high half e % 2.
__host__ __device__ inline int x_k(int lane, int half, int e) { return 32 * half + 8 * (lane & 3) + e; }

// Scales and zeros come in pairs per lane: entry 2 * g + h of a tile's 16 is row g + 8 * h.
__host__ __device__ inline int pair_index(int row_in_tile) { return 2 * (row_in_tile & 7) + (row_in_tile >> 3); }

// --- fp16: two nibbles -> two halves -------------------------------------------------------------

constexpr uint32_t kFp16Magic = 0x64006400u;   // 1024.0 in both halves
constexpr uint32_t kFp16Sixteenth = 0x2C002C00u;  // 1/16 in both halves

// A register r of a word, before the zero point: halves 1024 + q (r even) or 1024 + 16 q (r odd).
__host__ __device__ inline uint32_t fp16_pair_bits(uint32_t word, int r) {
  const uint32_t v = r >= 2 ? word >> 8 : word;
  return (v & ((r & 1) ? 0x00F000F0u : 0x000F000Fu)) | kFp16Magic;
}

// The half2 added (r even) or fma-added after x 1/16 (r odd) to give q - z exactly:
// -(1024 + z) = 0xE400 | z and -(64 + z) = 0xD400 | 16 z (the ulp of 64 is 1/16). z in 0..63.
__host__ __device__ inline uint32_t fp16_zero_bits(uint32_t z, int r) {
  const uint32_t h = (r & 1) ? (0xD400u | (z << 4)) : (0xE400u | z);
  return h | (h << 16);
}

// --- bf16: two nibbles -> two bfloat16 ------------------------------------------------------------

constexpr uint32_t kBf16Magic = 0x43004300u;   // 128.0 in both halves
constexpr uint32_t kBf16One = 0x3F803F80u;

__host__ __device__ inline uint32_t bf16_pair_bits(uint32_t word, int r) {
  return ((word >> (4 * r)) & 0x000F000Fu) | kBf16Magic;   // halves 128 + q
}

// -(128 + z) in both halves (the ulp of 128 in bf16 is 1). z in 0..127.
__host__ __device__ inline uint32_t bf16_zero_bits(uint32_t z) {
  const uint32_t h = 0xC300u | z;
  return h | (h << 16);
}

}  // namespace int4

// Tile configuration of the M <= 64 kernel (cuda/int4_mm.cuh): WN x WK warps per CTA, R 16-row tiles per
// warp, KPS 64-column blocks per warp and stage, STAGES-deep cp.async pipeline. cuda/tuned.cuh picks one
// per range of M.
template <int WN_, int WK_, int R_, int KPS_, int STAGES_>
struct Int4Tile {
  static constexpr int WN = WN_, WK = WK_, R = R_, KPS = KPS_, STAGES = STAGES_;
  static constexpr int kWarps = WN * WK, kThreads = 32 * kWarps, kTiles = WN * R, KS = WK * KPS;
};

// Split-K factor (CTAs per cluster along K) from shapes and occupancy only, so a CUDA graph replays the
// same launch: double it while the CTAs over N (ctas_n) fill fewer than `fill` x the resident slots and
// every CTA keeps at least two stages; at most 8 (the portable cluster size).
__host__ __device__ inline int int4_choose_split(int ctas_n, int stages, int slots, float fill) {
  int split = 1;
  while (split < 8 && ctas_n * split < fill * slots && stages >= 4 * split) split *= 2;
  return split;
}

// Two kinds of per-group zero information (tensor `zeros`, same shape as `scales`):
//   kUint8: integer zero points z (uint8):        w = (q - z) * s     (tinyinfer's quantizer, GPTQ, AWQ)
//   kFloat: float offsets m (the scales' dtype):  w = q * s + m       (GGUF Q4_1's "min")
enum class Int4Zeros { kUint8 = 0, kFloat = 1 };

// What bindings.cpp hands the launchers of cuda/int4_linear.cu (raw pointers; layouts as above).
struct Int4LinearParams {
  const void* x;            // (M, K) activations, fp16 or bf16 (x_bf16), rows 16-byte aligned
  const void* qweight;      // (N/16, Kp/64, 32, 4) int32
  const void* scales;       // (N/16, Kp/G, 16) fp16 or bf16 (scales_bf16)
  const void* zeros;        // (N/16, Kp/G, 16) uint8, or the scales' dtype for kFloat
  void* y;                  // int4_linear: (M, N); dequant: W (N, K); in x's dtype
  int M, N, K, group_size;  // N % 16 == 0, K % group_size == 0, group_size in {32, 64, 128}
  bool x_bf16, scales_bf16;
  Int4Zeros zero_kind;
  bool pdl;                 // launch with programmatic dependent launch (sm_90+)
};

}  // namespace tinyinfer
