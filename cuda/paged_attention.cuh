// paged_attention.cuh -- causal attention of 1..16 (or more) new queries per sequence over a paged K/V
// cache on tensor cores, split-KV ("flash-decoding", Dao et al. 2023; online softmax as in FlashAttention-2,
// Dao 2023), for head dims 64 and 128 and the MLA latent shape 576 / 512 (V = K's first 512 columns).
//
// CTA (p, h, b): partition p of sequence b's keys (attn_partition_keys of the *actual* seq_len), KV head
// h's query heads (a chunk of them), every new query of the sequence. The query rows (head x query) are
// the M dimension of mma.m16n8k16, MT m-tiles of 16 rows per pass; more rows take more passes. Per tile
// of TK keys, streamed through a STAGES-deep cp.async pipeline (16-byte copies, keys past the partition
// zero-filled and never read from the cache):
//   1. S = Q K^T: work items (16-key group, m-tile) are spread over the warps; Q and K fragments come
//      from shared memory by ldmatrix; scores in log2 units, masked (causal, partition end) to -inf;
//      each item's row maxima -> shared memory.
//   2. running max per row m_new = max(m_old, tile max) (double-buffered in shared memory, so every warp
//      sees the same value); P = exp2(S - m_new) -> shared memory in the cache dtype; row sums stay in
//      the item owner's registers, rescaled by exp2(m_old - m_new) each tile.
//   3. O = O exp2(m_old - m_new) + P V: each warp owns Dv / W output columns for all rows (P by ldmatrix,
//      V by ldmatrix.trans), fp32 accumulators in registers.
// Three barriers per tile. With one partition (P = 1, from shapes) the CTA writes O / l straight to the
// output and an extra grid slice (blockIdx.z = B) zeroes the padding rows; otherwise it writes (O, m, l)
// to the workspace and paged_attention_merge_kernel combines the live partitions (attention.cuh algebra).
// Everything about the launch depends on shapes only, so CUDA graphs replay it for any lengths. A quantized
// cache (int8 / fp8, float16 scales) is dequantized to T as its tiles are loaded (plain loads).
#pragma once

#include <cstdint>

#include "attention.cuh"
#include "kv_quant.cuh"
#include "ptx.cuh"

namespace tinyinfer {

template <typename T, int D, int DV, int MT, class C>
__global__ void __launch_bounds__(C::kThreads, 1) paged_attention_kernel(const PagedAttentionArgs a,
                                                                      const PagedAttentionPlan plan) {
  constexpr int R = 16 * MT, TK = C::TK, KG = TK / 16, W = C::kWarps, STAGES = C::STAGES;
  constexpr int CW = DV / W, NB = CW / 8, ITEMS = KG * MT, IPW = (ITEMS + W - 1) / W;
  constexpr int KP = D + kRowPad, VP = DV + kRowPad, PP = TK + kRowPad;
  static_assert(CW % 16 == 0 && TK % 16 == 0 && D % 16 == 0, "tile shapes");
  TI_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(a.out);
  if (static_cast<int>(blockIdx.z) == a.num_seqs) {  // P = 1 only: this slice zeroes the padding rows
    const int c = blockIdx.y * gridDim.x + blockIdx.x, n = gridDim.x * gridDim.y, width = a.num_q_heads * DV;
    for (int row = a.query_start_loc[a.num_seqs] + c; row < a.num_tokens; row += n)
      for (int e = tid; e < width; e += C::kThreads) out[static_cast<int64_t>(row) * width + e] = from_float<T>(0.f);
    return;
  }
  const int p = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / plan.head_chunks, chunk = blockIdx.y % plan.head_chunks;
  // Clamped to the table's capacity so that a malformed seq_len can never walk off the table row.
  const int seq_len = min(a.seq_lens[b], a.max_blocks * a.block_size);
  const int q0 = a.query_start_loc[b], q_len = a.query_start_loc[b + 1] - q0;
  const int part = attn_partition_keys(seq_len, plan.num_splits, TK, plan.min_chunk);
  const int kbeg = p * part, kend = min(seq_len, kbeg + part);
  const int group = a.num_q_heads / a.num_kv_heads, head0 = kvh * group + chunk * plan.chunk_heads;
  const int heads = min(plan.chunk_heads, kvh * group + group - head0);
  if (q_len <= 0 || kbeg >= seq_len || heads <= 0) return;  // the merge never reads this partition

  const bool alias = a.v_aliases_k;
  const AttnSmemPlan sp = attn_smem_plan(D, DV, TK, STAGES, R, sizeof(T), alias);
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = reinterpret_cast<T*>(smem + sp.v_off);
  T* sq = reinterpret_cast<T*>(smem + sp.q_off);
  T* spp = reinterpret_cast<T*>(smem + sp.p_off);
  float* rowmax = reinterpret_cast<float*>(smem + sp.f_off);  // [KG][R]
  float* lred = rowmax + KG * R;                               // [KG][R]
  float* mrun = lred + KG * R;                                 // [2][R]
  int* row_t = reinterpret_cast<int*>(smem + sp.i_off);
  int* row_h = row_t + R;
  int* row_pos = row_h + R;
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int32_t* table = a.block_tables + static_cast<int64_t>(b) * a.bt_stride;
  const CacheStrides ks{a.k_s0, a.k_s1, a.k_s2}, vs{a.v_s0, a.v_s1, a.v_s2};
  const CacheStrides kss{a.ks0, a.ks1, a.ks2}, vss{a.vs0, a.vs1, a.vs2};   // a quantized cache's scales
  const int tiles = (kend - kbeg + TK - 1) / TK, shift = a.block_shift, mask = a.block_size - 1;
  const float scale_log2 = a.scale * kLog2e;

  // Tile `tile` of K (and V unless it aliases K) into stage tile % STAGES; always commits a group.
  auto issue_tile = [&](int tile) {
    if (tile < tiles) {
      const int tpos0 = kbeg + tile * TK;
      T* dk = sk + (tile % STAGES) * sp.k_stage;
      T* dv = sv + (tile % STAGES) * sp.v_stage;
      constexpr int CK = D / 8;                  // 16-byte chunks per key row of K, then of V
      const int ct = alias ? CK : CK + DV / 8;
#pragma unroll 1
      for (int id = tid; id < TK * ct; id += C::kThreads) {
        const int j = id / ct, c = id % ct;
        const int pos = min(tpos0 + j, kend - 1);
        const int64_t blk = table[pos >> shift];
        const bool is_k = c < CK, valid = tpos0 + j < kend;
        const int col = (is_k ? c : c - CK) * 8;
        if (a.kv_quant != kKVNone)  // 8 bytes -> 8 values x the slot's scale, stored now (kv_quant.cuh)
          dequantize_chunk<T>(is_k ? a.k : a.v, is_k ? ks : vs, is_k ? a.k_scale : a.v_scale, is_k ? kss : vss, blk,
                              pos & mask, kvh, col, a.kv_quant, valid, (is_k ? dk + j * KP : dv + j * VP) + col);
        else if (is_k) ptx::cp_async_16(dk + j * KP + col, kc + cache_row_start(ks, blk, pos & mask, kvh) + col, valid);
        else ptx::cp_async_16(dv + j * VP + col, vc + cache_row_start(vs, blk, pos & mask, kvh) + col, valid);
      }
    }
    ptx::cp_async_commit();
  };

  const int total_rows = heads * q_len;
  for (int row0 = 0; row0 < total_rows; row0 += R) {
    const int nrows = min(R, total_rows - row0);
    for (int r = tid; r < R; r += C::kThreads) {  // row r = (query qi, head hl) of this pass
      const int rr = row0 + r, qi = rr / heads;
      row_t[r] = r < nrows ? q0 + qi : 0;
      row_h[r] = r < nrows ? head0 + rr % heads : 0;
      row_pos[r] = r < nrows ? seq_len - q_len + qi : -1;  // -1: a dead row sees no key
      mrun[R + r] = neg_inf();                            // the "previous" maximum of tile 0
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue_tile(s);
    __syncthreads();
    for (int e = tid; e < R * (D / 8); e += C::kThreads) {  // Q rows of this pass (dead rows zero)
      const int r = e / (D / 8), c = (e % (D / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < nrows)
        v = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + row_t[r] * a.q_s0 + row_h[r] * a.q_s1 + c);
      *reinterpret_cast<uint4*>(sq + r * KP + c) = v;
    }

    float o[MT][NB][4] = {};
    float lsum[IPW][2] = {};
    for (int tile = 0; tile < tiles; ++tile) {
      ptx::cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile landed for all threads; everyone is done with tile - 1 (stage, P, maxima)
      issue_tile(tile + STAGES - 1);
      const T* tk = sk + (tile % STAGES) * sp.k_stage;
      const T* tv = alias ? tk : sv + (tile % STAGES) * sp.v_stage;
      const int vpitch = alias ? KP : VP, tpos0 = kbeg + tile * TK, cur = (tile & 1) * R, prev = R - cur;
      float sf[IPW][2][4];
      // 1. scores of this warp's (key group, m-tile) items, masked, and their row maxima
#pragma unroll
      for (int it = 0; it < IPW; ++it) {
        const int id = warp + it * W, kg = id / MT, mt = id % MT;  // item: (key group, m-tile)
        if (id >= ITEMS) continue;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) sf[it][n][i] = 0.f;
#pragma unroll 4
        for (int d16 = 0; d16 < D / 16; ++d16) {
          uint32_t qa[4], kb[4];
          ptx::ldmatrix_x4(qa, sq + (mt * 16 + (lane & 15)) * KP + d16 * 16 + 8 * (lane >> 4));
          ptx::ldmatrix_x4(kb, tk + (kg * 16 + (lane & 7) + 8 * (lane >> 4)) * KP + d16 * 16 + 8 * ((lane >> 3) & 1));
          ptx::mma_16816<T>(sf[it][0], qa, kb[0], kb[1]);
          ptx::mma_16816<T>(sf[it][1], qa, kb[2], kb[3]);
        }
        float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = mt * 16 + g + 8 * (i >> 1), key = tpos0 + kg * 16 + n * 8 + 2 * t + (i & 1);
            const bool ok = key < kend && key <= row_pos[row];
            sf[it][n][i] = ok ? sf[it][n][i] * scale_log2 : neg_inf();
            mx[i >> 1] = fmaxf(mx[i >> 1], sf[it][n][i]);
          }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
          if (t == 0) rowmax[kg * R + mt * 16 + g + 8 * h] = mx[h];
        }
      }
      __syncthreads();
      // 2. running maxima, probabilities into shared memory, row sums in registers
#pragma unroll
      for (int it = 0; it < IPW; ++it) {
        const int id = warp + it * W, kg = id / MT, mt = id % MT;
        if (id >= ITEMS) continue;  // the same items as in step 1
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = mt * 16 + g + 8 * h;
          float m_new = mrun[prev + row];
#pragma unroll
          for (int k = 0; k < KG; ++k) m_new = fmaxf(m_new, rowmax[k * R + row]);
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const float p0 = m_new == neg_inf() ? 0.f : ptx::ex2(sf[it][n][2 * h] - m_new);
            const float p1 = m_new == neg_inf() ? 0.f : ptx::ex2(sf[it][n][2 * h + 1] - m_new);
            sum += p0 + p1;
            const uint32_t pair = uint32_t(raw_bits(from_float<T>(p0))) | (uint32_t(raw_bits(from_float<T>(p1))) << 16);
            *reinterpret_cast<uint32_t*>(spp + row * PP + kg * 16 + n * 8 + 2 * t) = pair;
          }
          lsum[it][h] = lsum[it][h] * rescale_factor(mrun[prev + row], m_new) + sum;
          if (kg == 0 && t == 0) mrun[cur + row] = m_new;
        }
      }
      __syncthreads();
      // 3. O = O * exp2(m_old - m_new) + P V over this warp's columns
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = mt * 16 + g + 8 * h;
          const float alpha = rescale_factor(mrun[prev + row], mrun[cur + row]);
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            o[mt][nb][2 * h] *= alpha;
            o[mt][nb][2 * h + 1] *= alpha;
          }
        }
#pragma unroll
      for (int kk = 0; kk < KG; ++kk) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ptx::ldmatrix_x4(pa[mt], spp + (mt * 16 + (lane & 15)) * PP + kk * 16 + 8 * (lane >> 4));
#pragma unroll
        for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
          uint32_t vb[4];
          ptx::ldmatrix_x4_trans(vb, tv + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * vpitch + warp * CW +
                                         nb2 * 16 + 8 * (lane >> 4));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            ptx::mma_16816<T>(o[mt][2 * nb2], pa[mt], vb[0], vb[1]);
            ptx::mma_16816<T>(o[mt][2 * nb2 + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
    ptx::cp_async_wait<0>();
    // Row sums: each item's quad partials -> lred[key group][row]; a row's l is their sum.
#pragma unroll
    for (int it = 0; it < IPW; ++it) {
      const int id = warp + it * W;
      if (id >= ITEMS) continue;
      const int row0 = (id % MT) * 16 + g, kg = id / MT;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = lsum[it][h];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0) lred[kg * R + row0 + 8 * h] = v;
      }
    }
    __syncthreads();
    const int last = ((tiles - 1) & 1) * R;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + g + 8 * h;
        if (row >= nrows) continue;
        float l = 0.f;
#pragma unroll
        for (int k = 0; k < KG; ++k) l += lred[k * R + row];
        const int64_t slot = static_cast<int64_t>(row_t[row]) * a.num_q_heads + row_h[row];
        if (plan.num_splits == 1) {  // final output, normalised; no visible key -> zeros
          const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            const uint32_t pair = uint32_t(raw_bits(from_float<T>(o[mt][nb][2 * h] * inv))) |
                                  (uint32_t(raw_bits(from_float<T>(o[mt][nb][2 * h + 1] * inv))) << 16);
            *reinterpret_cast<uint32_t*>(out + slot * DV + warp * CW + nb * 8 + 2 * t) = pair;
          }
        } else {
          const int64_t ws = slot * plan.num_splits + p;
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
            *reinterpret_cast<float2*>(a.ws_out + ws * DV + warp * CW + nb * 8 + 2 * t) =
                make_float2(o[mt][nb][2 * h], o[mt][nb][2 * h + 1]);
          if (warp == 0 && t == 0) {
            a.ws_max[ws] = mrun[last + row];
            a.ws_sum[ws] = l;
          }
        }
      }
    __syncthreads();  // the next pass rewrites rows, Q, maxima and the stages
  }
}

// Combines the live partitions of each (token, head) row: out = sum_p O_p w_p, w_p = lse_weight.
// Grid (T, Hq); padding rows (no owning sequence) and rows with no visible key get zeros.
template <typename T, int DV>
__global__ void __launch_bounds__(128) paged_attention_merge_kernel(const PagedAttentionArgs a, const PagedAttentionPlan plan,
                                                                    int tile) {
  const int t = blockIdx.x, h = blockIdx.y;
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(t) * a.num_q_heads + h) * DV;
  const int b = static_cast<int>(sequence_of_row(a.query_start_loc, a.num_seqs, t));
  const int seq_len = b < 0 ? 0 : min(a.seq_lens[b], a.max_blocks * a.block_size);
  const int parts = b < 0 || seq_len <= 0 ? 0
      : attn_live_partitions(seq_len, attn_partition_keys(seq_len, plan.num_splits, tile, plan.min_chunk));
  const int64_t base = (static_cast<int64_t>(t) * a.num_q_heads + h) * plan.num_splits;
  LseState total = lse_empty();
  for (int q = 0; q < parts; ++q) total = lse_merge(total, {a.ws_max[base + q], a.ws_sum[base + q]});
  for (int d = threadIdx.x; d < DV; d += 128) {
    float acc = 0.f;
    for (int q = 0; q < parts; ++q) acc += lse_weight(a.ws_max[base + q], total) * a.ws_out[(base + q) * DV + d];
    out[d] = from_float<T>(acc);
  }
}

}  // namespace tinyinfer
