// paged_attention.cu -- the shipped configurations of the tensor-core paged-attention kernel
// (cuda/paged_attention.cuh, one per head dim and m-tile count, from cuda/tuned.cuh), the launch plan
// from shapes and the device (never from lengths: CUDA-graph safe), and the launch.
//
// Plan: a CTA takes the query heads of one KV head (MLA: chunks of 32 of its up to 128 heads) x every
// new query of a sequence; MT = 1, 2 or 4 m-tiles of 16 rows per pass from the mean q_len T / B; the
// number of key partitions P fills the resident CTA slots (SMs x occupancy) once, bounded so that no
// partition is shorter than kAttnMinChunk keys at the block table's full width.
// Op contract: README "The op contracts"; binding: cuda/bind_attention.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_launch.cuh"
#include "tuned.cuh"

namespace tinyinfer {
namespace {

// Calls fn.run<T, D, DV, MT, Config>() for the shipped configuration of these shapes.
template <typename T, int D, int DV, class C, class Fn>
cudaError_t with_m_tiles(int mt, const Fn& fn) {
  if (mt == 1) return fn.template run<T, D, DV, 1, C>();
  if (mt == 2) return fn.template run<T, D, DV, 2, C>();
  if constexpr (attn_max_m_tiles(D) >= 4) {
    if (mt == 4) return fn.template run<T, D, DV, 4, C>();
  }
  return cudaErrorInvalidValue;
}

template <typename T, class Fn>
cudaError_t with_dims(int d, int dv, int mt, const Fn& fn) {
  if (d == 64 && dv == 64) return with_m_tiles<T, 64, 64, tuned::Attn64>(mt, fn);
  if (d == 128 && dv == 128) return with_m_tiles<T, 128, 128, tuned::Attn128>(mt, fn);
  if (d == 576 && dv == 512) return with_m_tiles<T, 576, 512, tuned::AttnMla>(mt, fn);
  return cudaErrorInvalidValue;
}

template <class Fn>
cudaError_t with_config(PagedAttentionDtype dtype, int d, int dv, int mt, const Fn& fn) {
  return dtype == PagedAttentionDtype::kHalf ? with_dims<__half>(d, dv, mt, fn) : with_dims<__nv_bfloat16>(d, dv, mt, fn);
}

struct Occupancy {
  int* per_sm;
  template <typename T, int D, int DV, int MT, class C>
  cudaError_t run() const { return paged_attention_occupancy<T, D, DV, MT, C>(per_sm); }
};

struct Launch {
  const PagedAttentionArgs& a;
  const PagedAttentionPlan& plan;
  cudaStream_t stream;
  template <typename T, int D, int DV, int MT, class C>
  cudaError_t run() const { return launch_paged_attention_config<T, D, DV, MT, C>(a, plan, stream); }
};

}  // namespace

// The launch plan for these shapes on the current device (attention.cuh: attn_plan_shapes / _splits).
cudaError_t paged_attention_make_plan(const PagedAttentionArgs& a, PagedAttentionPlan* plan) {
  *plan = attn_plan_shapes(a, tuned::kAttnMinChunk);
  int per_sm = 1, device = 0, sms = 1;
  cudaError_t err = with_config(a.dtype, a.head_dim, a.head_dim_v, plan->m_tiles, Occupancy{&per_sm});
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  attn_plan_splits(a, sms * per_sm, tuned::kAttnSplitFill, plan);
  return cudaSuccess;
}

cudaError_t paged_attention_launch(const PagedAttentionArgs& a, const PagedAttentionPlan& plan, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  return with_config(a.dtype, a.head_dim, a.head_dim_v, plan.m_tiles, Launch{a, plan, stream});
}

}  // namespace tinyinfer
