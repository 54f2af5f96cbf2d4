"""Every hot op of the engine as a `torch.library` custom op (PyTorch's custom-operator API).

The body of each op is its reference (ops/reference.py), so the op runs on any device and states what
it computes; ops/cpu.py and ops/cuda.py register faster kernels for the `cpu` and `cuda` dispatch keys
of the same ops, so callers never choose: `ops.paged_attention(...)` runs the CUDA kernel on a GPU, the
batched CPU path on a CPU, and the reference wherever neither applies. The fake (meta) impls let the
ops be traced and captured in CUDA graphs. Contracts: docs/architecture.md ("The op contracts").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tinyinfer.ops import reference


# k_scale / v_scale: a quantized cache's scales (ops/kv_quant.py), None for a model-dtype cache; int8
# caches' scales are written by the K/V write, so they are mutated args.
@torch.library.custom_op("tinyinfer::store_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def store_kv(k: Tensor, v: Optional[Tensor], k_cache: Tensor, v_cache: Optional[Tensor],
             slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
             v_scale: Optional[Tensor] = None) -> None:
    reference.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@store_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    return None  # mutates the caches in place; nothing to allocate under tracing / graph capture


@torch.library.custom_op("tinyinfer::paged_attention", mutates_args=())
def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                     scale, k_scale, v_scale)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("tinyinfer::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return reference.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tinyinfer::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    return reference.int4_linear(x, qweight, scales, zeros, group_size)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0] * 16)


@torch.library.custom_op("tinyinfer::q8_linear", mutates_args=())
def q8_linear(x: Tensor, packed: Tensor, scales: Tensor, n: int) -> Tensor:
    return reference.q8_linear(x, packed, scales, n)


@q8_linear.register_fake
def _(x, packed, scales, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@torch.library.custom_op("tinyinfer::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return reference.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("tinyinfer::fused_add_rmsnorm", mutates_args=())
def fused_add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float
                      ) -> tuple[Tensor, Tensor]:
    return reference.fused_add_rmsnorm(x, residual, weight, eps)


@fused_add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    stream_dtype = torch.promote_types(x.dtype, residual.dtype)
    if residual.dtype == torch.float32 and x.dtype != torch.float32:      # a float32 stream
        return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=torch.promote_types(stream_dtype, weight.dtype)),
            x.new_empty(x.shape, dtype=stream_dtype))


@torch.library.custom_op("tinyinfer::silu_and_mul", mutates_args=())
def silu_and_mul(x: Tensor) -> Tensor:
    return reference.silu_and_mul(x)


@silu_and_mul.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("tinyinfer::rope_store_kv",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def rope_store_kv(q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor, positions: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                  k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor]:
    return reference.rope_store_kv(q, k, v, cos_sin_cache, positions, k_cache, v_cache, slot_mapping,
                                   k_scale, v_scale)


@rope_store_kv.register_fake
def _(q, k, v, cos_sin_cache, positions, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    dtype = torch.promote_types(q.dtype, cos_sin_cache.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)
