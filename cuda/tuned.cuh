// tuned.cuh -- the kernel configurations tinyinfer ships, in one place, and the card they were measured
// on. `make gpu-tune` (tools/gpu_tune.py) times every variant on a GPU, prints a table and the
// configuration it would choose; copy that choice here together with the card's name.
//
// Measured on: predicted, not yet measured on a GPU (cuda/NOTES.md gives the reasoning for each value).
#pragma once

#include "attention.cuh"
#include "int4.cuh"

namespace tinyinfer {
namespace tuned {

// INT4 linear, M <= 64 (cuda/int4_mm.cuh): Int4Tile<WN, WK, R, KPS, STAGES> per range of M.
using Int4M8 = Int4Tile<1, 4, 2, 2, 4>;    // M 1..8: 2 tiles x 4 K-warps, ~72 KB of weights in flight per SM
using Int4M16 = Int4Tile<1, 4, 4, 2, 4>;   // M 9..16: 4 tiles per warp, x re-read at most once per weight byte
using Int4M32 = Int4Tile<4, 1, 2, 2, 4>;   // M 17..32: 128 rows per CTA
using Int4M64 = Int4Tile<4, 1, 2, 2, 4>;   // M 33..64
constexpr float kInt4SplitFill = 1.0f;     // split K until the CTAs fill this many x the resident slots

// Paged attention (cuda/paged_attention.cuh): AttnTile<warps, keys per tile, stages> per head dim.
using Attn64 = AttnTile<4, 64, 4>;    // 4 x 64 x 144 B x 2 (K, V) = 72 KB of stages: 2-3 CTAs per SM
using Attn128 = AttnTile<4, 64, 3>;   // 3 x 64 x 272 B x 2 = 102 KB: 2 CTAs per SM, 2 tiles (64 KB) in flight each
using AttnMla = AttnTile<8, 32, 2>;   // 576/512: 2 x 32 x 1168 B (V aliased) + Q; 8 warps share the 512 V columns
constexpr float kAttnSplitFill = 1.0f;  // splits along the keys until the CTAs fill the resident slots once
constexpr int kAttnMinChunk = 256;      // no partition shorter than this (short contexts: fewer partitions)

}  // namespace tuned
}  // namespace tinyinfer
