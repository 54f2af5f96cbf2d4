// ops.cpp -- the CPU kernels of cpu/*.h as the operator library `tinyinfer_cpu` (torch.library's C++
// registration; built and loaded by tinyinfer/extensions/cpu.py). tinyinfer/ops/cpu.py calls them as the
// `cpu` kernels of the engine's ops, with the same arguments as the op: paged_attention reads the
// paged cache in place (cpu/paged_attention.h); rope_store_kv and store_kv repeat their references
// bit for bit (cpu/rope_store_kv.h), and so do the norms (cpu/norm.h: the reference's ATen calls);
// decode_layers runs a whole decode step through them (cpu/decode_step.h); q8_linear is the Q8_0
// lm_head (cpu/q8_linear.h); int4_linear multiplies by an INT4 layer's own kernel layout through
// integer dot products (cpu/int4_linear.h).
#include <torch/library.h>

#include "decode_step.h"
#include "int4_linear.h"
#include "norm.h"
#include "paged_attention.h"
#include "q8_linear.h"
#include "rope_store_kv.h"

// The library's name: tinyinfer_cpu, unless the build names it otherwise (the tests load a second,
// portable build beside the native one). The macros expand TINYINFER_CPU_LIB before torch's use it.
#ifndef TINYINFER_CPU_LIB
#define TINYINFER_CPU_LIB tinyinfer_cpu
#endif
#define TINYINFER_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TINYINFER_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TINYINFER_LIBRARY(TINYINFER_CPU_LIB, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  m.def("rope_store_kv(Tensor q, Tensor k, Tensor v, Tensor cos_sin_cache, Tensor positions, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor(c!)? k_scale=None, "
        "Tensor(d!)? v_scale=None) -> (Tensor, Tensor)");
  m.def("store_kv(Tensor k, Tensor? v, Tensor(a!) k_cache, Tensor(b!)? v_cache, Tensor slot_mapping, "
        "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] kinds, int[] groups, int[] dims, float eps, "
        "Tensor cos_sin_cache, Tensor positions, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
        "float scale, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor packed, Tensor scales, int n) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TINYINFER_LIBRARY_IMPL(TINYINFER_CPU_LIB, CPU, m) {
  m.impl("paged_attention", &tinyinfer_cpu::paged_attention);
  m.impl("rope_store_kv", &tinyinfer_cpu::rope_store_kv);
  m.impl("store_kv", &tinyinfer_cpu::store_kv);
  m.impl("rms_norm", &tinyinfer_cpu::rms_norm);
  m.impl("fused_add_rmsnorm", &tinyinfer_cpu::fused_add_rmsnorm);
  m.impl("decode_layers", &tinyinfer_cpu::decode_layers);
  m.impl("q8_linear", &tinyinfer_cpu::q8_linear);
  m.impl("int4_linear", &tinyinfer_cpu::int4_linear);
}

// decode_layers takes oneDNN-reordered weights (opaque mkldnn tensors), which dispatch as MkldnnCPU.
TINYINFER_LIBRARY_IMPL(TINYINFER_CPU_LIB, MkldnnCPU, m) {
  m.impl("decode_layers", &tinyinfer_cpu::decode_layers);
}
