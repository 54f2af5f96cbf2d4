"""Quantized KV cache rows: the reference of the quantize (in the K/V write) and the dequantize (in paged
attention), for the two cache types besides the model dtype (docs/kv-cache.md). Both keep one float16
scale per (token, KV head), written beside the row in the same slot, from the row's own amax:
  * fp8  (torch.float8_e4m3fn, Micikevicius et al., "FP8 Formats for Deep Learning", 2022):
        s = fp16(max(amax_d |x| / 448, 2^-14))  q = e4m3(clamp(x / s, -448, 448))   x' = q * s
  * int8:
        s = fp16(max(amax_d |x| / 127, 2^-14))  q = clamp(round(x / s), -127, 127)   x' = q * s
(the scale is rounded to its stored float16 first, and the row is divided by the stored value, so x'
uses exactly the scale the rounding used; round = round half to even, torch's; the clamp keeps a row
whose float16 scale rounded down from saturating into NaN).

Scales are float16, (NB, BS, Hkv) per layer beside the cache (NB, BS, Hkv, D).
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


QMAX = {torch.float8_e4m3fn: FP8_MAX, torch.int8: INT8_MAX}


def row_scales(x: Tensor, cache_dtype: torch.dtype) -> Tensor:
    """x (T, H, D) -> the stored float16 scales (T, H): amax over D / (448 | 127), at least 2^-14."""
    amax = x.float().abs().amax(dim=-1)
    return (amax / QMAX[cache_dtype]).clamp(MIN_SCALE, 65504.0).to(SCALE_DTYPE)


def quantize(x: Tensor, cache_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x (T, H, D) in the model dtype -> (q (T, H, D) in cache_dtype, scales (T, H) float16)."""
    if cache_dtype not in QMAX:
        raise ValueError(f"quantize: no quantized KV cache of dtype {cache_dtype}")
    s = row_scales(x, cache_dtype)                                          # (T, H)
    ratio = x.float() / s.float()[..., None]
    if cache_dtype == torch.int8:
        return ratio.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s
    return ratio.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    """q (..., H, D) quantized rows, scales (..., H) -> float32 (..., H, D)."""
    return q.float() * scales.float()[..., None]


def store_quantized(x: Tensor, cache: Tensor, scale: Tensor, blocks: Tensor, offsets: Tensor) -> None:
    """Rows x (n, H, D) quantized into cache (NB, BS, H, D) at (blocks, offsets) (n,) each, their
    scales into `scale` (NB, BS, H) at the same slots."""
    q, s = quantize(x, cache.dtype)
    cache[blocks, offsets] = q
    scale[blocks, offsets] = s


def gather_dequantized(cache: Tensor, scale: Optional[Tensor], index: tuple) -> Tensor:
    """cache[index] as float32 rows, dequantized when the cache is quantized (index: the block /
    offset indices of the gathered positions; `scale` as store_quantized takes it)."""
    rows = cache[index]
    if scale is None or not is_quantized(cache):
        return rows.float()
    return dequantize(rows, scale[index])


def select_slots(cache: Tensor, scale: Optional[Tensor], slots: Tensor) -> Tensor:
    """Rows of the flat slots (n,) of cache (NB, BS, H, D) as float32 (n, H, D), dequantized when the
    cache is quantized (one index_select of the rows, and of the int8 scales)."""
    rows = cache.flatten(0, 1).index_select(0, slots)
    if scale is None or not is_quantized(cache):
        return rows.float()
    return dequantize(rows, scale.flatten(0, 1).index_select(0, slots))        # scales (n, H)


def roundtrip(x: Tensor, cache: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """x (T, H, D) as the cache will give it back: quantized and dequantized to x's dtype when the cache
    is quantized (what paged_prefill_attention reads), x itself otherwise. Fresh prefill attends over
    these, so a prompt sees the same K/V whether its prefix was computed now or found cached."""
    if cache is None or scale is None or not is_quantized(cache):
        return x
    return dequantize(*quantize(x, cache.dtype)).to(x.dtype)
