"""CPU kernels: the `cpu` dispatch key of the ops (as ops/cuda.py registers the CUDA kernels for `cuda`).

On a CPU a small model's decode step is a few hundred small tensor ops, and what each costs is mostly
the fixed price of one call (~1-2 us), not arithmetic (docs/cpu-performance.md). So these kernels
compute what their references compute in as few calls as possible, and are registered straight with
the dispatcher (`torch.library.Library.impl`), which calls them with none of the Python wrapping
`CustomOpDef.register_kernel` adds (~2 us an op). Here:
  * paged_attention, rope_store_kv, store_kv, rms_norm, fused_add_rmsnorm: the C++ kernels of cpu/
    (tinyinfer/extensions/cpu.py builds them on first use) -- attention reads the paged cache in
    place, RoPE + K/V write is one pass, the norms repeat the reference's operations in order (same
    bits). Where the library cannot be built: ops/cpu_attention.py for attention, the cache rows
    written by one `index_copy_` per cache, and the references for the rest.
  * linear and int4_linear: ops/cpu_matmul.py; q8_linear (the Q8_0 lm_head): cpu/q8_linear.h, integer
    dot products with activations quantized per 32 to int8 (the reference: float32 with the weight
    dequantized whole per call).
  * silu_and_mul: the reference itself, registered here so that a call skips the custom op's own
    dispatch, which wraps it in a compiler guard whose first use imports torch's compiler stack
    (~100 MiB resident, docs/cpu-performance.md) and costs ~2 us a call.
The fused-op tests hold these to the unfused model math bit for bit (tests/test_fused_ops.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.ops import library, reference
from tinyinfer.ops.cpu_attention import paged_attention_grouped
from tinyinfer.ops.cpu_matmul import int4_linear_cpu, linear_cpu
from tinyinfer.ops.kv_quant import is_quantized

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what the C++ kernels run


def _kernels_take(*tensors: Optional[Tensor]) -> bool:
    """The C++ kernels' terms: one dtype they run, innermost dimension contiguous."""
    dtype = tensors[0].dtype
    return dtype in CPU_KERNEL_DTYPES and all(t is None or (t.dtype == dtype and t.stride(-1) == 1)
                                              for t in tensors)


def _cache_takes(rows: Tensor, *caches: Optional[Tensor]) -> bool:
    """The C++ kernels' terms for a cache: the rows' dtype, or a quantized cache (ops/kv_quant.py,
    float16 scales); innermost dimension contiguous."""
    return all(c is None or (c.stride(-1) == 1 and (c.dtype == rows.dtype or is_quantized(c)))
               for c in caches)


def _slot_rows(cache: Optional[Tensor]) -> Optional[Tensor]:
    """cache (NB, BS, ...) as a view (NB * BS, ...) of one row per slot; None if no such view."""
    try:
        return None if cache is None else cache.view(-1, *cache.shape[2:])
    except RuntimeError:
        return None


def store_kv_cpu(k: Tensor, v: Optional[Tensor], k_cache: Tensor, v_cache: Optional[Tensor],
                 slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
                 v_scale: Optional[Tensor] = None) -> None:
    # k (T, Hkv, D), v (T, Hkv, Dv) -> cache rows slot_mapping (T,); -1 (padding) rows are skipped;
    # a quantized cache quantizes them (ops/kv_quant.py).
    if slot_mapping.numel() == 0:
        return
    lib = cpu_kernels.library()
    if lib is not None and _kernels_take(k, v) and _cache_takes(k, k_cache, v_cache):
        return lib.store_kv.default(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    k_rows, v_rows = _slot_rows(k_cache), _slot_rows(v_cache)
    if (k_rows is None or (v is not None and v_rows is None) or int(slot_mapping.min()) < 0
            or is_quantized(k_cache)):
        return reference.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    k_rows.index_copy_(0, slot_mapping, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    if v is not None:
        v_rows.index_copy_(0, slot_mapping, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))


def rope_store_kv_cpu(q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor, positions: Tensor,
                      k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                      k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor]:
    # reference.rope_store_kv in one C++ pass: the same products and sum per element, so the same bits.
    lib = cpu_kernels.library()
    if lib is not None and _kernels_take(q, k, v, cos_sin_cache) and _cache_takes(k, k_cache, v_cache):
        return lib.rope_store_kv.default(q, k, v, cos_sin_cache, positions, k_cache, v_cache,
                                         slot_mapping, k_scale, v_scale)
    return reference.rope_store_kv(q, k, v, cos_sin_cache, positions, k_cache, v_cache, slot_mapping,
                                   k_scale, v_scale)


def paged_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                        seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                        k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
    # The ops.paged_attention contract (ops/reference.py); the C++ kernel reads the cache in place
    # (and dequantizes a quantized one as it reads it).
    lib = cpu_kernels.library()
    if lib is not None and _kernels_take(q) and _cache_takes(q, k_cache, v_cache):
        return lib.paged_attention.default(q, k_cache, v_cache, block_tables, seq_lens,
                                           query_start_loc, scale, k_scale, v_scale)
    return paged_attention_grouped(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                   scale, k_scale, v_scale)


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # reference.rms_norm's operations in the same order, from C++.
    lib = cpu_kernels.library()
    return lib.rms_norm.default(x, weight, eps) if lib is not None else reference.rms_norm(x, weight, eps)


def fused_add_rmsnorm_cpu(x: Tensor, residual: Tensor, weight: Tensor, eps: float
                          ) -> tuple[Tensor, Tensor]:
    lib = cpu_kernels.library()
    if lib is not None:
        return lib.fused_add_rmsnorm.default(x, residual, weight, eps)
    return reference.fused_add_rmsnorm(x, residual, weight, eps)


def q8_linear_cpu(x: Tensor, packed: Tensor, scales: Tensor, n: int) -> Tensor:
    lib = cpu_kernels.library()
    if lib is not None and x.dtype in CPU_KERNEL_DTYPES:
        return lib.q8_linear.default(x, packed, scales, n)
    return reference.q8_linear(x, packed, scales, n)


_LIB = torch.library.Library("tinyinfer", "IMPL")     # kept alive: it owns the registrations
CPU_KERNELS = {"store_kv": store_kv_cpu, "rope_store_kv": rope_store_kv_cpu, "rms_norm": rms_norm_cpu,
               "fused_add_rmsnorm": fused_add_rmsnorm_cpu, "paged_attention": paged_attention_cpu,
               "linear": linear_cpu, "int4_linear": int4_linear_cpu, "q8_linear": q8_linear_cpu,
               "silu_and_mul": reference.silu_and_mul}


@functools.cache
def register_cpu_kernels() -> None:
    """Register every CPU_KERNELS entry for the `CPU` key of its op (once per process)."""
    for name, kernel in CPU_KERNELS.items():
        assert hasattr(library, name), name
        _LIB.impl(name, kernel, "CPU")
