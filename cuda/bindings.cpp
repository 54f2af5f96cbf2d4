// bindings.cpp -- the only translation unit of the extension that includes torch (the slowest compile):
// each op's binding checks its arguments, turns tensors into raw pointers, strides and sizes, and calls
// the plain C++ launcher of its cuda/*.cu file on the current CUDA stream. The bindings live in one
// header per kernel family (cuda/bind_*.h), all included here; the ops themselves (and their CPU
// references) are in tinyinfer/ops/reference.py, and tinyinfer/ops/cuda.py registers these functions as their
// `cuda` implementations.
//
// To add a kernel family: write cuda/bind_<family>.h (declare the launcher, a binding function that
// checks its arguments), include it below, and add one m.def line to the module at the bottom.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/python.h>

#include <algorithm>
#include <optional>

#include "bind_common.h"
#include "bind_store_kv.h"
#include "bind_fused.h"
#include "bind_int4.h"
#include "bind_kv_quant.h"
#include "bind_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tinyinfer CUDA kernels (see cuda/*.cu); called through the ops in tinyinfer/ops/";
  m.def("int4_linear", &int4_linear, "y = x @ dequant(W).T for INT4 W in the kernel layout (tinyinfer/ops/int4_format.py)",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"));
  m.def("int4_linear_out", &int4_linear_out, "int4_linear writing into a given (M, N) tensor (tests poison it)",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"), pybind11::arg("out"));
  m.def("paged_attention", &paged_attention, "Causal attention of 1..16 new queries per sequence over the "
        "paged K/V cache (split-KV + log-sum-exp merge); contract in docs/architecture.md",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("seq_lens"), pybind11::arg("query_start_loc"), pybind11::arg("scale"),
        pybind11::arg("k_scale") = pybind11::none(), pybind11::arg("v_scale") = pybind11::none());
  m.def("store_kv_quant", &store_kv_quant, "Quantize K/V rows into an int8 / fp8 paged cache and its float16 "
        "scales (tinyinfer/ops/kv_quant.py)", pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("slot_mapping"), pybind11::arg("k_scale"), pybind11::arg("v_scale"));
  m.def("store_kv", &store_kv, "Write K/V rows into their paged-cache slots (slot -1 skipped)",
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slot_mapping"));
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, scaled by weight (fp32 accumulation)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("fused_add_rmsnorm", &fused_add_rmsnorm, "(rms_norm(x + residual) * weight, x + residual) in one kernel",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("silu_and_mul", &silu_and_mul, "SwiGLU's activation: silu(x[..., :F]) * x[..., F:] in one kernel",
        pybind11::arg("x"));
  m.def("rope_store_kv", &rope_store_kv, "RoPE on q and k from the cos/sin table rows at each token's position, "
        "+ K/V write into the paged cache; returns (rotated q, rotated k)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cos_sin_cache"),
        pybind11::arg("positions"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("slot_mapping"));
}
