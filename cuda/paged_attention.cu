// paged_attention.cu -- causal attention of 1..16 new queries per sequence over a paged K/V cache,
// split-KV ("flash-decoding"): many CTAs stream disjoint slices of the cache, a second kernel merges
// their partial softmaxes (see attention.cuh for the log-sum-exp algebra).
//
// Layout (the op contract in docs/architecture.md): q (T, Hq, D); k_cache (NB, BS, Hkv, D) and
// v_cache (NB, BS, Hkv, Dv), any strides with a unit last stride and 16-byte aligned rows (MLA passes
// v_cache = k_cache[..., :512], which this kernel notices and loads each latent row once);
// block_tables (B, MB) int32; seq_lens (B,) int32; query_start_loc (B+1,) int32; out (T, Hq, Dv).
//
// Launch shape, from tensor shapes only (replays in a CUDA graph for any lengths):
//   split: grid (P, Hkv * head_chunks, B), 128 threads. CTA (p, h, b) owns keys
//          [p * PART, (p + 1) * PART) of sequence b, KV head h, and every query row (query head of
//          the group x new token) of that head: each K/V row is loaded once and used by all of them
//          (groups wider than 16 heads, i.e. MLA, are split into chunks of 16 heads). Rows are
//          processed 16 at a time (4 at a time for plain decode of a GQA-4 group); more rows than
//          that (e.g. q_len 16 x 4 heads) take several passes over the partition.
//          K/V tiles of 32 keys (16 for MLA) stream through a 4-stage (MLA: 3) cp.async pipeline, 16-byte
//          copies; keys past seq_len are zero-filled, never read. Scores, softmax and accumulators
//          are fp32. Writes unnormalised partial outputs + (max, sum) per row to a workspace.
//   merge: grid (T, Hq), 128 threads: rescales and sums the partitions of each row; padding rows
//          (>= query_start_loc[B]) get zeros.
//
// Host emulation: with TINYINFER_EMULATE defined, tests/host/emulate_paged_attention.cpp compiles
// this very file with g++ against a small CUDA stand-in (threads, barriers, deferred cp.async), so
// the shipped kernel runs, slowly, on a CPU (tests/test_paged_attention.py). Only the includes, the
// cp.async wrappers and the launchers differ under that macro.
#ifdef TINYINFER_EMULATE
#include "emulate_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>

#include "attention.cuh"

#ifndef TINYINFER_EMULATE
#define TI_DYNAMIC_SMEM(name) extern __shared__ __align__(16) char name[]
#endif

namespace tinyinfer {
namespace {

constexpr int kThreads = kAttnThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = kAttnMaxRows;

// ---- conversions ----------------------------------------------------------------------------------

__device__ inline float2 to_float2(uint32_t bits, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}
__device__ inline float2 to_float2(uint32_t bits, __nv_bfloat16) {
  // bf16 is the top half of an fp32: widening is a shift.
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- cp.async ---------------------------------------------------------------------------------------

// 16-byte global->shared copy that bypasses L1; with valid = false it writes 16 zero bytes and reads
// nothing (src must still be a mapped address).
#ifdef TINYINFER_EMULATE
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) { emu::cp_async_16(smem, gmem, valid); }
__device__ inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N> __device__ inline void cp_async_wait() { emu::cp_async_wait(N); }
#else
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

__device__ inline float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- split kernel ---------------------------------------------------------------------------------------

// Shared memory of one CTA, carved from the dynamic buffer per split_smem_plan().
struct SplitSmem {
  char* stages;  // K/V pipeline stages; after the last tile, scratch for the output reduction
  float* q;      // (kMaxRows, D) queries * scale * log2(e)
  float* red;    // (slices, kMaxRows, TOK) partial dot products
  float* p;      // (kMaxRows, TOK) scores, then probabilities
  float* m;      // (kMaxRows) running max (log2 units)
  float* l;      // (kMaxRows) running sum
  float* alpha;  // (kMaxRows) rescale of the accumulators for the current tile
  int* row_t;    // (kMaxRows) query row in q / out
  int* row_h;    // (kMaxRows) query head
  int* row_pos;  // (kMaxRows) the row's position: last key it may see
};

struct SplitArgs {
  PagedAttentionArgs a;
  int part;        // keys per partition
  int num_parts;   // P (workspace stride)
  int chunk_heads; // query heads per CTA
  int head_chunks;
  bool v_alias;
};

template <typename T, int D, int DV, int TOK, int ROWS>
__device__ void split_pass(const SplitArgs& s, const SplitSmem& sm, int b, int kvh, int p,
                           int seq_len, int q0, int q_len, int head0, int heads, int row0, int rows) {
  constexpr int CPR_K = D / 8;                // 16-byte chunks per K row
  constexpr int CPR_V = DV / 8;
  static_assert(TOK * CPR_K % kThreads == 0 && TOK * CPR_V % kThreads == 0, "tile / thread mismatch");
  constexpr int SLICES = kThreads / TOK;      // the D axis is split over this many thread groups
  constexpr int SLICE = D / SLICES;
  static_assert(SLICE % 8 == 0, "slice must be whole 16-byte chunks");
  constexpr int PAIRS = DV / 2;
  constexpr int PPT = PAIRS >= kThreads ? PAIRS / kThreads : 1;     // column pairs per thread
  constexpr int SUBSETS = PAIRS >= kThreads ? 1 : kThreads / PAIRS;  // token subsets
  constexpr int SUB_TOK = TOK / SUBSETS;
  static_assert(SUB_TOK % 4 == 0 && PAIRS % (PAIRS >= kThreads ? kThreads : PAIRS) == 0, "PV split");
  constexpr int KPITCH = D + kRowPad;
  constexpr int VPITCH_OWN = DV + kRowPad;

  constexpr int kStages = attn_pipeline_stages(D);
  const PagedAttentionArgs& a = s.a;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T* k_base = static_cast<const T*>(a.k);
  const T* v_base = static_cast<const T*>(a.v);
  const int32_t* table = a.block_tables + static_cast<int64_t>(b) * a.bt_stride;
  const CacheStrides ks{a.k_s0, a.k_s1, a.k_s2}, vs{a.v_s0, a.v_s1, a.v_s2};
  T* sk = reinterpret_cast<T*>(sm.stages);
  T* sv = sk + kStages * TOK * KPITCH;
  const int v_pitch = s.v_alias ? KPITCH : VPITCH_OWN;

  const int key0 = p * s.part;
  const int keys = min(s.part, seq_len - key0);
  const int tiles = (keys + TOK - 1) / TOK;

  // Row bookkeeping: row r of this pass is query i = (row0 + r) / heads, head head0 + (row0 + r) % heads.
  if (tid < ROWS) {
    int r = tid, rr = row0 + r;
    bool live = r < rows;
    sm.row_t[r] = live ? q0 + rr / heads : 0;
    sm.row_h[r] = live ? head0 + rr % heads : 0;
    sm.row_pos[r] = live ? static_cast<int>(query_position(seq_len, q_len, rr / heads)) : -1;
    sm.m[r] = neg_inf();
    sm.l[r] = 0.f;
    sm.alpha[r] = 0.f;
  }

  // Thread tid copies 16-byte chunks tid, tid + 128, ... of the tile's K rows (and V rows). When
  // D == Dv the K and V chunks of one thread sit on the same key, so its block lookup is shared.
  // Keys past seq_len are zero-filled (src-size 0: nothing is read); their address is clamped to the
  // last key so that only the sequence's own table entries are ever loaded. Block sizes are powers
  // of two (the binding checks), so position -> (table entry, row) is a shift and a mask. The chunk
  // loops stay rolled: unrolled, the compiler keeps every chunk's addresses live across the tile loop.
  const int shift = a.block_shift, row_mask = a.block_size - 1;
  const bool load_v = !s.v_alias;
  auto issue_tile = [&](int tile) {
    if (tile < tiles) {
      const int stage = tile % kStages;
      const int tpos0 = key0 + tile * TOK;
      T* dk = sk + stage * TOK * KPITCH;
      T* dv = sv + stage * TOK * VPITCH_OWN;
#pragma unroll 1
      for (int id = tid; id < TOK * CPR_K; id += kThreads) {
        const int j = id / CPR_K, col = (id % CPR_K) * 8;
        const int pos = min(tpos0 + j, seq_len - 1);
        const bool valid = tpos0 + j < seq_len;
        const int64_t blk = table[pos >> shift];
        const int off = pos & row_mask;
        cp_async_16(dk + j * KPITCH + col, k_base + cache_row_start(ks, blk, off, kvh) + col, valid);
        if (D == DV && load_v)
          cp_async_16(dv + j * VPITCH_OWN + col, v_base + cache_row_start(vs, blk, off, kvh) + col, valid);
      }
      if (D != DV && load_v) {
#pragma unroll 1
        for (int id = tid; id < TOK * CPR_V; id += kThreads) {
          const int j = id / CPR_V, col = (id % CPR_V) * 8;
          const int pos = min(tpos0 + j, seq_len - 1);
          const bool valid = tpos0 + j < seq_len;
          cp_async_16(dv + j * VPITCH_OWN + col,
                      v_base + cache_row_start(vs, table[pos >> shift], pos & row_mask, kvh) + col, valid);
        }
      }
    }
    cp_async_commit();  // always, so that group counting stays uniform
  };

#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue_tile(t);

  __syncthreads();  // row bookkeeping visible

  // Queries of this pass, pre-scaled so that scores come out in log2 units; dead rows are zero.
  {
    const T* qb = static_cast<const T*>(a.q);
    const float qscale = a.scale * kLog2e;
    for (int e = tid; e < ROWS * D; e += kThreads) {
      const int r = e / D, d = e % D;
      float x = 0.f;
      if (r < rows)
        x = to_float(qb[static_cast<int64_t>(sm.row_t[r]) * a.q_s0 +
                        static_cast<int64_t>(sm.row_h[r]) * a.q_s1 + d]) * qscale;
      sm.q[r * D + d] = x;
    }
  }

  float2 o[ROWS][PPT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int k = 0; k < PPT; ++k) o[r][k] = make_float2(0.f, 0.f);

  const int sj = tid % TOK, slice = tid / TOK;       // scores: key sj, D-slice `slice`
  const int pair = tid % (PAIRS >= kThreads ? kThreads : PAIRS);
  const int subset = tid / (PAIRS >= kThreads ? kThreads : PAIRS);

  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` is in shared memory; stage (tile - 1) is free again
    issue_tile(tile + kStages - 1);
    const int stage = tile % kStages;
    const T* tk = sk + stage * TOK * KPITCH;
    const T* tv = s.v_alias ? tk : sv + stage * TOK * VPITCH_OWN;
    const int tpos0 = key0 + tile * TOK;

    // 1. partial dot products over this thread's D-slice, for every row.
    {
      float acc[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
      const T* krow = tk + sj * KPITCH + slice * SLICE;
      const float* qs = sm.q + slice * SLICE;
      // Not unrolled: unrolling lets the compiler hoist every q load of the slice (ROWS x SLICE floats)
      // into registers at once, which costs occupancy for no gain -- the loop is shared-memory bound.
#pragma unroll 1
      for (int c = 0; c < SLICE / 8; ++c) {
        uint4 raw = *reinterpret_cast<const uint4*>(krow + c * 8);
        float2 k01 = to_float2(raw.x, T()), k23 = to_float2(raw.y, T());
        float2 k45 = to_float2(raw.z, T()), k67 = to_float2(raw.w, T());
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float4 qa = *reinterpret_cast<const float4*>(qs + r * D + c * 8);
          float4 qc = *reinterpret_cast<const float4*>(qs + r * D + c * 8 + 4);
          acc[r] += qa.x * k01.x + qa.y * k01.y + qa.z * k23.x + qa.w * k23.y +
                    qc.x * k45.x + qc.y * k45.y + qc.z * k67.x + qc.w * k67.y;
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) sm.red[(slice * ROWS + r) * TOK + sj] = acc[r];
    }
    __syncthreads();

    // 2. full scores with causal / length masking; dead rows get probability 0.
    for (int e = tid; e < ROWS * TOK; e += kThreads) {
      int r = e / TOK, j = e % TOK, pos = tpos0 + j;
      float sc = 0.f;
#pragma unroll
      for (int sl = 0; sl < SLICES; ++sl) sc += sm.red[(sl * ROWS + r) * TOK + j];
      bool live = r < rows;
      bool visible = pos < seq_len && pos <= sm.row_pos[r];
      sm.p[e] = !live ? 0.f : (visible ? sc : neg_inf());
    }
    __syncthreads();

    // 3. online softmax, one warp per row: p = exp2(s - m_new), l = l * alpha + sum p.
    for (int r = warp; r < rows; r += kWarps) {
      float sc = lane < TOK ? sm.p[r * TOK + lane] : neg_inf();
      float m_old = sm.m[r];
      float m_new = fmaxf(m_old, warp_max(sc));
      float pr = m_new == neg_inf() ? 0.f : exp2f(sc - m_new);  // exp2(-inf) = 0 for masked keys
      float sum = warp_sum(pr);
      if (lane < TOK) sm.p[r * TOK + lane] = pr;
      if (lane == 0) {
        float alpha = rescale_factor(m_old, m_new);
        sm.alpha[r] = alpha;
        sm.l[r] = sm.l[r] * alpha + sum;
        sm.m[r] = m_new;
      }
    }
    __syncthreads();

    // 4. o = o * alpha + P V over this thread's token subset and column pairs.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float al = sm.alpha[r];
#pragma unroll
      for (int k = 0; k < PPT; ++k) { o[r][k].x *= al; o[r][k].y *= al; }
    }
#pragma unroll 1
    for (int j0 = 0; j0 < SUB_TOK; j0 += 4) {
      const int j = subset * SUB_TOK + j0;
      float2 vf[4][PPT];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int k = 0; k < PPT; ++k) {
          int col = 2 * (pair + k * kThreads);
          vf[u][k] = to_float2(*reinterpret_cast<const uint32_t*>(tv + (j + u) * v_pitch + col), T());
        }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float4 p4 = *reinterpret_cast<const float4*>(sm.p + r * TOK + j);
#pragma unroll
        for (int k = 0; k < PPT; ++k) {
          o[r][k].x += p4.x * vf[0][k].x + p4.y * vf[1][k].x + p4.z * vf[2][k].x + p4.w * vf[3][k].x;
          o[r][k].y += p4.x * vf[0][k].y + p4.y * vf[1][k].y + p4.z * vf[2][k].y + p4.w * vf[3][k].y;
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // stages are free: reuse them as reduction scratch

  // Partial outputs to the workspace: ws_o[(t, h, p)][DV], ws_m / ws_l[(t, h, p)].
  auto ws_index = [&](int r) {
    return (static_cast<int64_t>(sm.row_t[r]) * a.num_q_heads + sm.row_h[r]) * s.num_parts + p;
  };
  if (SUBSETS == 1) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < rows) {
        float* dst = a.ws_out + ws_index(r) * DV;
#pragma unroll
        for (int k = 0; k < PPT; ++k)
          *reinterpret_cast<float2*>(dst + 2 * (pair + k * kThreads)) = o[r][k];
      }
    }
  } else {
    float* scratch = reinterpret_cast<float*>(sm.stages);  // (SUBSETS, ROWS, DV)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      *reinterpret_cast<float2*>(scratch + (subset * ROWS + r) * DV + 2 * pair) = o[r][0];
    __syncthreads();
    for (int e = tid; e < rows * DV; e += kThreads) {
      int r = e / DV, col = e % DV;
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < SUBSETS; ++u) sum += scratch[(u * ROWS + r) * DV + col];
      a.ws_out[ws_index(r) * DV + col] = sum;
    }
  }
  if (tid < rows) {
    a.ws_max[ws_index(tid)] = sm.m[tid];
    a.ws_sum[ws_index(tid)] = sm.l[tid];
  }
  __syncthreads();  // the next pass rewrites the row bookkeeping and the stages
}

// CTAs per SM the register budget must allow (no spills): the 4-row decode kernel keeps 3 resident
// (3 x 3 tiles of 16 KB = 144 KB of K/V in flight per SM), the 16-row kernel 2 (96 KB); both are
// well above the ~30-60 KB that HBM latency x bandwidth asks for. MLA: one (correctness only).
__host__ __device__ constexpr int split_min_blocks(int d, int rows) { return d > 128 ? 1 : rows <= 4 ? 3 : 2; }

template <typename T, int D, int DV, int TOK, int ROWS>
__global__ void __launch_bounds__(kThreads, split_min_blocks(D, ROWS))
paged_attention_split_kernel(const SplitArgs s) {
  TI_DYNAMIC_SMEM(smem);
  const PagedAttentionArgs& a = s.a;
  const int p = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / s.head_chunks, chunk = blockIdx.y % s.head_chunks;
  // Clamped to the table's capacity so that a malformed seq_len can never walk off the table row.
  const int seq_len = min(a.seq_lens[b], a.max_blocks * a.block_size);
  const int q0 = a.query_start_loc[b], q_len = a.query_start_loc[b + 1] - q0;
  if (q_len <= 0 || p * s.part >= seq_len) return;  // nothing to do; the merge never reads this slot

  const int group = a.num_q_heads / a.num_kv_heads;
  const int head0 = kvh * group + chunk * s.chunk_heads;
  const int heads = min(s.chunk_heads, kvh * group + group - head0);
  if (heads <= 0) return;

  SplitSmemPlan plan = split_smem_plan(D, DV, TOK, attn_pipeline_stages(D), ROWS, kThreads,
                                       static_cast<int>(sizeof(T)), s.v_alias);
  constexpr int SLICES = kThreads / TOK;
  SplitSmem sm;
  sm.stages = smem;
  sm.q = reinterpret_cast<float*>(smem + plan.stage_bytes);
  sm.red = sm.q + ROWS * D;
  sm.p = sm.red + SLICES * ROWS * TOK;
  sm.m = sm.p + ROWS * TOK;
  sm.l = sm.m + ROWS;
  sm.alpha = sm.l + ROWS;
  sm.row_t = reinterpret_cast<int*>(sm.alpha + ROWS);
  sm.row_h = sm.row_t + ROWS;
  sm.row_pos = sm.row_h + ROWS;

  // Every (query, head) row of the group; more rows than ROWS re-stream the partition (from L2).
  const int total_rows = heads * q_len;
  for (int row0 = 0; row0 < total_rows; row0 += ROWS)
    split_pass<T, D, DV, TOK, ROWS>(s, sm, b, kvh, p, seq_len, q0, q_len, head0, heads, row0,
                                    min(ROWS, total_rows - row0));
}

// ---- merge kernel ----------------------------------------------------------------------------------

struct MergeArgs {
  void* out;                     // (T, Hq, Dv)
  const float* ws_out;           // (T, Hq, P, Dv)
  const float* ws_max;           // (T, Hq, P)
  const float* ws_sum;           // (T, Hq, P)
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  int num_seqs, num_q_heads, head_dim_v, part, num_parts, max_tokens;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
paged_attention_merge_kernel(const MergeArgs a) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int dv = a.head_dim_v;
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(t) * a.num_q_heads + h) * dv;
  const int b = static_cast<int>(sequence_of_row(a.query_start_loc, a.num_seqs, t));
  // Padding rows (b < 0) and rows whose keys are all masked get zeros.
  const int parts = b < 0 ? 0 : num_partitions(min(a.seq_lens[b], a.max_tokens), a.part);
  const int64_t base = (static_cast<int64_t>(t) * a.num_q_heads + h) * a.num_parts;
  LseState total = lse_empty();
  for (int q = 0; q < parts; ++q) total = lse_merge(total, {a.ws_max[base + q], a.ws_sum[base + q]});
  for (int d = threadIdx.x; d < dv; d += kThreads) {
    float acc = 0.f;
    for (int q = 0; q < parts; ++q)
      acc += lse_weight(a.ws_max[base + q], total) * a.ws_out[(base + q) * dv + d];
    out[d] = from_float<T>(acc);
  }
}

#ifndef TINYINFER_EMULATE
template <typename T, int D, int DV, int TOK, int ROWS>
cudaError_t launch_split(const SplitArgs& s, cudaStream_t stream) {
  const PagedAttentionArgs& a = s.a;
  constexpr int kStages = attn_pipeline_stages(D);
  SplitSmemPlan plan = split_smem_plan(D, DV, TOK, kStages, ROWS, kThreads,
                                       static_cast<int>(sizeof(T)), s.v_alias);
  // The opt-in above 48 KiB is per function and per device; the largest plan (V not aliased) covers
  // both cases. Done once per device (a bit per device id), not per call.
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (!(configured.load() & bit)) {
    err = cudaFuncSetAttribute(
        paged_attention_split_kernel<T, D, DV, TOK, ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        split_smem_plan(D, DV, TOK, kStages, ROWS, kThreads, static_cast<int>(sizeof(T)), false).total_bytes);
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit);
  }
  if (a.num_seqs > 0) {  // with no sequences every row is padding: the merge alone writes zeros
    dim3 grid(s.num_parts, a.num_kv_heads * s.head_chunks, a.num_seqs);
    paged_attention_split_kernel<T, D, DV, TOK, ROWS><<<grid, kThreads, plan.total_bytes, stream>>>(s);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  MergeArgs m{a.out, a.ws_out, a.ws_max, a.ws_sum, a.seq_lens, a.query_start_loc,
              a.num_seqs, a.num_q_heads, a.head_dim_v, s.part, s.num_parts,
              a.max_blocks * a.block_size};
  dim3 mgrid(a.num_tokens, a.num_q_heads);
  paged_attention_merge_kernel<T><<<mgrid, kThreads, 0, stream>>>(m);
  return cudaGetLastError();
}

// rows_per_pass (4 or 16) comes from the plan, i.e. from shapes; MLA groups always fill 16 rows.
template <typename T>
cudaError_t dispatch_dims(const SplitArgs& s, int rows_per_pass, cudaStream_t stream) {
  const PagedAttentionArgs& a = s.a;
  const bool small = rows_per_pass <= 4;
  if (a.head_dim == 64 && a.head_dim_v == 64)
    return small ? launch_split<T, 64, 64, attn_tile_tokens(64), 4>(s, stream)
                 : launch_split<T, 64, 64, attn_tile_tokens(64), kMaxRows>(s, stream);
  if (a.head_dim == 128 && a.head_dim_v == 128)
    return small ? launch_split<T, 128, 128, attn_tile_tokens(128), 4>(s, stream)
                 : launch_split<T, 128, 128, attn_tile_tokens(128), kMaxRows>(s, stream);
  if (a.head_dim == 576 && a.head_dim_v == 512)
    return launch_split<T, 576, 512, attn_tile_tokens(576), kMaxRows>(s, stream);
  return cudaErrorInvalidValue;
}

#endif  // TINYINFER_EMULATE

}  // namespace

#ifndef TINYINFER_EMULATE
cudaError_t paged_attention_launch(const PagedAttentionArgs& args, const PagedAttentionPlan& plan,
                                   cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  SplitArgs s;
  s.a = args;
  s.part = plan.partition_tokens;
  s.num_parts = plan.num_partitions;
  s.chunk_heads = plan.chunk_heads;
  s.head_chunks = plan.head_chunks;
  s.v_alias = args.v_aliases_k;
  if (args.dtype == PagedAttentionDtype::kHalf) return dispatch_dims<__half>(s, plan.rows_per_pass, stream);
  return dispatch_dims<__nv_bfloat16>(s, plan.rows_per_pass, stream);
}
#endif  // TINYINFER_EMULATE

}  // namespace tinyinfer
