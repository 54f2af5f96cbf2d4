// The tensor-core paged-attention launches of launch_paged_attention_config (cuda/paged_attention.cuh),
// on the emulator (emulate_cuda.h): the kernel over its grid, then the merge kernel when the plan splits
// the keys. Shared by emulate_paged_attention.cpp and emulate_kv_quant.cpp; include after
// paged_attention.cuh and tuned.cuh.
#pragma once

namespace tinyinfer {

template <typename T, int D, int DV, int MT, class C>
void emulate_launch(const PagedAttentionArgs& a, const PagedAttentionPlan& plan) {
  const int bytes = attn_smem_plan(D, DV, C::TK, C::STAGES, 16 * MT, sizeof(T), a.v_aliases_k).total_bytes;
  const bool single = plan.num_splits == 1;
  emu::run_grid(dim3(plan.num_splits, a.num_kv_heads * plan.head_chunks, a.num_seqs + (single ? 1 : 0)),
                C::kThreads, bytes, [&] { paged_attention_kernel<T, D, DV, MT, C>(a, plan); });
  if (!single)
    emu::run_grid(dim3(a.num_tokens, a.num_q_heads), 128, 0, [&] { paged_attention_merge_kernel<T, DV>(a, plan, C::TK); });
}

template <typename T, int D, int DV, class C>
void emulate_m_tiles(const PagedAttentionArgs& a, const PagedAttentionPlan& plan) {
  if (plan.m_tiles == 1) emulate_launch<T, D, DV, 1, C>(a, plan);
  else if (plan.m_tiles == 2) emulate_launch<T, D, DV, 2, C>(a, plan);
  else if constexpr (attn_max_m_tiles(D) >= 4) emulate_launch<T, D, DV, 4, C>(a, plan);
}

// The shipped configuration for a.head_dim (64, 128, or MLA's 576 / 512).
template <typename T>
void emulate_dispatch(const PagedAttentionArgs& a, const PagedAttentionPlan& plan) {
  if (a.head_dim == 64) emulate_m_tiles<T, 64, 64, tuned::Attn64>(a, plan);
  else if (a.head_dim == 128) emulate_m_tiles<T, 128, 128, tuned::Attn128>(a, plan);
  else emulate_m_tiles<T, 576, 512, tuned::AttnMla>(a, plan);
}

}  // namespace tinyinfer
