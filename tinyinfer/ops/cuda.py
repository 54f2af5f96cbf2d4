"""The CUDA kernels of `cuda/` as the `cuda` impl of each op (the override half of the custom-op design).

For every op named in `CUDA_IMPLS`, the `cuda` dispatch key runs the hand-written kernel from the
extension that `tinyinfer.extensions` builds or loads; when there is no extension (no toolkit, a failed
build) or the shapes are outside the kernel's limits (ops/limits.py), the impl runs the op's reference
(ops/reference.py) -- the same function that is the op's body, so there is one reference per op.
Registering compiles nothing: the extension is built or loaded at the first call on a CUDA tensor.

Adding a kernel: write cuda/<family>.cu, bind it in cuda/bindings.cpp (m.def), add one line here.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

from tinyinfer import extensions
from tinyinfer.ops import library, limits, reference
from tinyinfer.ops.kv_quant import is_quantized


def _paged_attention(ext: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     *rest: Any) -> torch.Tensor:
    # The kernel for fp16/bf16, its head dims and power-of-two blocks; anything else (an fp32 model
    # on a GPU, other head sizes) takes the reference. rest ends with a quantized cache's k_scale /
    # v_scale (None, None for the model dtype): the kernel dequantizes as it loads its tiles. Callers keep query runs <= MAX_KERNEL_Q_LEN
    # (layers/attention.py sends longer ones to ops.paged_prefill_attention).
    dims, block = (k_cache.shape[-1], v_cache.shape[-1]), k_cache.shape[1]
    if limits.paged_attention_kernel_covers(q.dtype, *dims, block):
        return ext.paged_attention(q, k_cache, v_cache, *rest)
    _warn_reference_once(f"paged_attention: no kernel for dtype {q.dtype}, head dims {dims}, "
                         f"block size {block}")
    return reference.paged_attention(q, k_cache, v_cache, *rest)


def _store_kv(ext: Any, k: torch.Tensor, v: Any, k_cache: torch.Tensor, v_cache: Any, slots: torch.Tensor,
              k_scale: Any = None, v_scale: Any = None) -> None:
    # A quantized cache (int8 / fp8, ops/kv_quant.py) takes the quantizing write (cuda/kv_quant.cu).
    if is_quantized(k_cache):
        return ext.store_kv_quant(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    return ext.store_kv(k, v, k_cache, v_cache, slots)


def _rope_store_kv(ext: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor,
                   positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor, k_scale: Any = None, v_scale: Any = None) -> Any:
    if not is_quantized(k_cache):
        return ext.rope_store_kv(q, k, v, cos_sin, positions, k_cache, v_cache, slots)
    # A quantized cache: RoPE alone (given caches of no blocks, the kernel writes no slot), then the
    # quantizing write of the rotated k and v: two kernels, and two empty tensors (no memory).
    none_k, none_v = q.new_empty(0, *k_cache.shape[1:]), q.new_empty(0, *v_cache.shape[1:])
    q_out, k_out = ext.rope_store_kv(q, k, v, cos_sin, positions, none_k, none_v, slots)
    ext.store_kv_quant(k_out, v, k_cache, v_cache, slots, k_scale, v_scale)
    return q_out, k_out


def _int4_linear(ext: Any, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    # The kernels take fp16/bf16 activations (uint8 zeros or floating offsets, M <= 64 in the
    # tensor-core kernel, dequantize + cuBLAS above); a float32 model runs the reference.
    if x.dtype not in limits.CUDA_KERNEL_DTYPES:
        return reference.int4_linear(x, qweight, scales, zeros, group_size)
    return ext.int4_linear(x, qweight, scales, zeros, group_size)


# Op name in tinyinfer.ops -> how its CUDA impl calls the extension: (extension module, *op args).
CUDA_IMPLS: dict[str, Callable[..., Any]] = {
    "store_kv": _store_kv,
    "rms_norm": lambda ext, *args: ext.rms_norm(*args),
    "fused_add_rmsnorm": lambda ext, *args: ext.fused_add_rmsnorm(*args),
    "rope_store_kv": _rope_store_kv,
    "silu_and_mul": lambda ext, *args: ext.silu_and_mul(*args),
    "int4_linear": _int4_linear,
    "paged_attention": _paged_attention,
}


def _warn_reference_once(what: str) -> None:
    # Python's default warning filter shows each distinct message once per process.
    warnings.warn(f"tinyinfer: {what}; using the (slow) reference path", RuntimeWarning, stacklevel=4)


def _cuda_impl(name: str, impl: Callable[..., Any], ref: Callable[..., Any]) -> Callable[..., Any]:
    def cuda_impl(*args: Any) -> Any:
        ext = extensions.extension()  # compiled (or loaded) at the first call on a CUDA tensor
        return ref(*args) if ext is None else impl(ext, *args)
    cuda_impl.__name__ = f"{name}_cuda"
    return cuda_impl


@functools.cache
def register_cuda_kernels() -> None:
    """Register every CUDA_IMPLS entry for the `cuda` key of its op (once per process; cheap)."""
    for name, impl in CUDA_IMPLS.items():
        getattr(library, name).register_kernel("cuda")(_cuda_impl(name, impl, getattr(reference, name)))
