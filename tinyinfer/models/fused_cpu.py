"""The fused CPU decode step: every decoder layer of a decode (or short verify) step in one C++ call.

A small model's batch-1 step on a CPU spent about half its time between its kernels -- module calls,
custom-op dispatch, views, the Python of each layer (docs/cpu-performance.md, issue 34). Where a model
is plain Llama (multi-head / grouped attention without biases or QK-norm, a SwiGLU MLP, dense or INT4
linears without biases or act-order) and the step only decodes, `decode_step` hands the embeddings,
the caches and each layer's weights -- in the form its CPU kernel multiplies by (ops/cpu_matmul.py:
linear_form, int4_form) -- to `decode_layers` (cpu/decode_step.h), which calls the same kernels the
per-op path reaches through the dispatcher, in the same order: the same bits
(tests/test_fused_cpu.py holds it to the per-op path bit for bit and to float64 within rounding).

Everything else keeps the per-op path: prefill, long query runs, tensor parallelism, other families,
no C++ library (TINYINFER_CPU_KERNELS=0), a KV cache stored in another dtype than the activations
that is not an FP8 / INT8 cache with its scales (those the step writes and reads with the per-op
path's kernels, docs/kv-cache.md), or `model.fused_cpu_decode = False`.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.layers.attention import AttentionMetadata, MultiHeadAttention
from tinyinfer.layers.linear import Int4Linear, Linear
from tinyinfer.layers.mlp import SwiGLU
from tinyinfer.ops.cpu import CPU_KERNEL_DTYPES
from tinyinfer.ops.cpu_matmul import INT4, int4_form, linear_form
from tinyinfer.ops.kv_quant import is_quantized
from tinyinfer.ops.limits import MAX_KERNEL_Q_LEN

Plan = tuple[list[Tensor], list[int], list[int]]       # weights, kinds, group sizes (decode_step.h)
# model -> (fusable, {one row?: Plan}); beside the model, not in it (a copy of it must not share them).
_MODELS: "weakref.WeakKeyDictionary[nn.Module, tuple[bool, dict[bool, Plan]]]" = weakref.WeakKeyDictionary()


def _plain_linear(m: nn.Module) -> bool:
    if type(m) is Linear:
        return m.bias is None
    return type(m) is Int4Linear and m.bias is None and m.perm is None


def fusable(model: nn.Module) -> bool:
    """Whether the model's layers are all of the shape decode_layers computes (checked once)."""
    cached = _MODELS.get(model)
    if cached is not None:
        return cached[0]
    layers = list(model.layers)
    dtype = model.norm.weight.dtype
    eps = {model.norm.eps}
    ok = (len(layers) > 0 and model.group is None and model.rotary is not None
          and dtype in CPU_KERNEL_DTYPES)
    for layer in layers if ok else ():
        attn, mlp = layer.attn, layer.mlp
        eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
        ok = ok and (type(attn) is MultiHeadAttention and attn.q_norm is None
                     and type(mlp) is SwiGLU and layer.group is None
                     and all(_plain_linear(m) for m in (attn.qkv_proj, attn.o_proj,
                                                         mlp.gate_up_proj, mlp.down_proj))
                     and all(getattr(m, "dtype", dtype) == dtype for m in (attn.qkv_proj, attn.o_proj,
                                                                           mlp.gate_up_proj,
                                                                           mlp.down_proj)))
    ok = ok and len(eps) == 1
    _MODELS[model] = (ok, {})
    return ok


def _form(m: nn.Module, dtype: torch.dtype, rows: int) -> tuple[int, Tensor, Tensor, int]:
    if type(m) is Linear:
        return linear_form(m.weight, dtype, rows)
    return int4_form(m.qweight, m.scales, m.zeros, m.in_features, m.group_size, dtype)


def plan(model: nn.Module, rows: int) -> Plan:
    """The weight lists decode_layers takes, for steps of one row or of several (the dense forms
    differ: ops/cpu_matmul.py); made at the first such step and kept while the model lives (after
    `fusable(model)`)."""
    plans = _MODELS[model][1]
    key = rows == 1
    if key not in plans:
        dtype = model.norm.weight.dtype
        weights: list[Tensor] = []
        kinds: list[int] = []
        groups: list[int] = []
        int4_zeros: list[Tensor] = []              # after the final norm, in order (decode_step.h)
        for layer in model.layers:
            weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj,
                      layer.mlp.down_proj):
                kind, a, b, group = _form(m, dtype, rows)
                weights += [a, b]
                kinds.append(kind)
                groups.append(group)
                if kind == INT4:
                    int4_zeros.append(m.zeros)
        weights.append(model.norm.weight)
        weights += int4_zeros
        plans[key] = (weights, kinds, groups)
    return plans[key]


def decode_step(model: nn.Module, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[Optional[Tensor], ...]]) -> Optional[Tensor]:
    """hidden (T, hidden) of the step through decode_layers, or None where the fused path does not
    apply (the caller then runs the per-op path). kv_caches: per layer (k_cache, v_cache), or with
    the scales of a quantized cache after them."""
    if meta.prefill or meta.max_q_len > MAX_KERNEL_Q_LEN or not fusable(model):
        return None
    lib = cpu_kernels.library()
    if lib is None:
        return None
    dtype = model.norm.weight.dtype
    k_caches, v_caches, k_scales, v_scales = [], [], [], []
    for k, v, *scales in kv_caches:
        # The model-dtype cache, or an FP8 / INT8 one with both its scales (ops/kv_quant.py): the
        # same rope_store_kv and paged_attention calls as the per-op path, with the same arguments.
        quantized = len(scales) == 2 and all(s is not None for s in scales) and is_quantized(k)
        if (v is None or k.stride(-1) != 1 or v.stride(-1) != 1 or v.dtype != k.dtype
                or (not quantized and (k.dtype != dtype or any(s is not None for s in scales)))):
            return None
        k_caches.append(k)
        v_caches.append(v)
        if quantized:
            k_scales.append(scales[0])
            v_scales.append(scales[1])
    if k_scales and len(k_scales) != len(k_caches):
        return None                                      # some layers quantized, others not
    weights, kinds, groups = plan(model, input_ids.shape[0])
    attn = model.layers[0].attn
    x = model.embed_tokens(input_ids)                                        # (T, hidden)
    return lib.decode_layers.default(
        x, weights, kinds, groups, [attn.num_heads, attn.num_kv_heads, attn.head_dim], model.norm.eps,
        model.rotary.cos_sin_cache, positions, k_caches, v_caches, meta.slot_mapping,
        meta.block_tables, meta.seq_lens, meta.query_start_loc, attn.scale, k_scales, v_scales)
