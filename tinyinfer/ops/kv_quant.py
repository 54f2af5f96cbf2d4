"""Quantized KV cache rows: the reference of the quantize (in the K/V write) and the dequantize (in paged
attention), for the two cache types besides the model dtype (docs/kv-cache.md):

  * fp8  (torch.float8_e4m3fn, Micikevicius et al., "FP8 Formats for Deep Learning", 2022): one scale
    per (layer, KV head), fixed for the engine's life (calibrated at load, engine/kv_calibrate.py):
        q = e4m3(clamp(x / s, -448, 448))       x' = q * s
  * int8: one scale per (token, KV head), written beside the row in the same slot:
        s = fp16(max(amax_d |x| / 127, 2^-14))  q = clamp(round(x / s), -127, 127)   x' = q * s
    (the scale is rounded to its stored float16 first, and the row is divided by the stored value, so
    x' uses exactly the scale the rounding used; round = round half to even, torch's).

Scales are float16 in both: (Hkv,) for fp8, (NB, BS, Hkv) for int8. A kernel reads either one as
(NB, BS, Hkv) through `slot_scales` (strides 0, 0, 1 for fp8), so one code path serves both.
The arithmetic is float32; tests/test_kv_quant.py checks it against float64 and torch's own e4m3 cast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
FP8_MAX = 448.0                 # largest finite e4m3fn value
INT8_MAX = 127.0                # symmetric: -127..127 (-128 unused)
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14          # smallest normal float16: an all-zero row still divides by a number


def is_quantized(cache: Tensor) -> bool:
    return cache.dtype in (torch.float8_e4m3fn, torch.int8)


def int8_row_scales(x: Tensor) -> Tensor:
    """x (T, H, D) -> the stored float16 scales (T, H): amax over D / 127, at least 2^-14."""
    amax = x.float().abs().amax(dim=-1)
    return (amax / INT8_MAX).clamp(MIN_SCALE, 65504.0).to(SCALE_DTYPE)


def quantize(x: Tensor, cache_dtype: torch.dtype, scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (T, H, D) in the model dtype -> (q (T, H, D) in cache_dtype, scales (T, H) float16).
    fp8: `scale` is the layer's (H,) float16 scales (returned expanded); int8: computed per row."""
    xf = x.float()
    if cache_dtype == torch.int8:
        s = int8_row_scales(x)                                              # (T, H)
        q = (xf / s.float()[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, s
    if cache_dtype == torch.float8_e4m3fn:
        s = scale.to(SCALE_DTYPE).expand(x.shape[0], x.shape[1])           # (T, H)
        q = (xf / s.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, s
    raise ValueError(f"quantize: no quantized KV cache of dtype {cache_dtype}")


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    """q (..., H, D) quantized rows, scales (..., H) -> float32 (..., H, D)."""
    return q.float() * scales.float()[..., None]


def slot_scales(scale: Tensor, cache: Tensor) -> Tensor:
    """A cache's scales as one per slot and head, (NB, BS, Hkv): the int8 scale tensor itself, the
    fp8 (Hkv,) scales broadcast (strides 0, 0, 1: no copy)."""
    if scale.dim() == 1:
        return scale.expand(cache.shape[0], cache.shape[1], scale.shape[0])
    return scale


def store_quantized(x: Tensor, cache: Tensor, scale: Tensor, blocks: Tensor, offsets: Tensor) -> None:
    """Rows x (n, H, D) quantized into cache (NB, BS, H, D) at (blocks, offsets) (n,) each; int8 rows
    write their scales into `scale` (NB, BS, H) at the same slots, fp8 rows read the layer's (H,)."""
    q, s = quantize(x, cache.dtype, scale)
    cache[blocks, offsets] = q
    if cache.dtype == torch.int8:
        scale[blocks, offsets] = s


def gather_dequantized(cache: Tensor, scale: Optional[Tensor], index: tuple) -> Tensor:
    """cache[index] as float32 rows, dequantized when the cache is quantized (index: the block /
    offset indices of the gathered positions; `scale` as store_quantized takes it)."""
    rows = cache[index]
    if scale is None or not is_quantized(cache):
        return rows.float()
    return dequantize(rows, slot_scales(scale, cache)[index])


def select_slots(cache: Tensor, scale: Optional[Tensor], slots: Tensor) -> Tensor:
    """Rows of the flat slots (n,) of cache (NB, BS, H, D) as float32 (n, H, D), dequantized when the
    cache is quantized (one index_select of the rows, and of the int8 scales)."""
    rows = cache.flatten(0, 1).index_select(0, slots)
    if scale is None or not is_quantized(cache):
        return rows.float()
    s = scale if scale.dim() == 1 else scale.flatten(0, 1).index_select(0, slots)   # (H,) | (n, H)
    return dequantize(rows, s)


def roundtrip(x: Tensor, cache: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """x (T, H, D) as the cache will give it back: quantized and dequantized to x's dtype when the cache
    is quantized (what paged_prefill_attention reads), x itself otherwise. Fresh prefill attends over
    these, so a prompt sees the same K/V whether its prefix was computed now or found cached."""
    if cache is None or scale is None or not is_quantized(cache):
        return x
    return dequantize(*quantize(x, cache.dtype, scale)).to(x.dtype)
