"""The paged KV cache's storage: one K and one V tensor per layer in the FlashAttention / vLLM paged
layout (Kwon et al., "PagedAttention", SOSP 2023), and how many tokens of it the engine allocates.

k_caches[i]: (num_blocks, block_size, n_kv_heads, head_dim)
v_caches[i]: (num_blocks, block_size, n_kv_heads, v_head_dim), or None when the attention keeps a single
             latent row per token (MLA), whose V is a view of K.
A quantized cache (kv_cache_dtype "fp8" / "int8", ops/kv_quant.py, docs/kv-cache.md) holds float8_e4m3fn
or int8 values and float16 scales beside them:
k_scales[i], v_scales[i]: (num_blocks, block_size, n_kv_heads), one per token and head, written with
             the row. None for the model dtype; MLA's V reads K's scales.

Pool size (`pool_tokens`), the same for the same command on every run:
  * on a CPU, a fixed byte budget: DEFAULT_CPU_KV_BYTES = 4 GiB (vLLM's CPU backend default,
    VLLM_CPU_KVCACHE_SPACE=4), or `kv_memory` (--kv-cache-memory);
  * on a GPU, `kv_memory` if given, else 80 % of the memory free once the weights are loaded (the rest:
    activations, CUDA graphs, workspace) -- on a GPU of its own that is the same from run to run;
  * either way no more than max_context x max_num_seqs tokens, all the scheduler can ever hold;
  * a pool larger than the memory available now is an error that says what to lower.
On a CPU the storage is `torch.empty`: the pages of a large allocation take RAM only once written, so
a 4 GiB pool starts in no time and a short run uses little of it. Slots nobody wrote
are never read (the paged-attention contract: positions past a sequence's length are masked, and
tests/test_paged_attention.py fills every unowned slot with NaN to prove it). On a GPU it is zeroed.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from tinyinfer.ops.kv_quant import KV_CACHE_DTYPES, SCALE_DTYPE

DEFAULT_CPU_KV_BYTES = 4 << 30
GPU_FREE_FRACTION = 0.80
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: Union[int, str]) -> int:
    """A KV budget: an int (bytes) or a string such as "4GiB", "512MiB", "2.5GB", "1000000"."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"kv_cache_memory={value!r}: give bytes as an int or a size such as '4GiB'")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_cache_memory={value!r} is not a size: give bytes, or a number with "
                             "a unit B / KB / KiB / MB / MiB / GB / GiB / TB / TiB, e.g. '4GiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"kv_cache_memory={value!r}: the KV cache needs a positive size")
    return n


def available_bytes(device: torch.device) -> int:
    """Memory that can be had now: free GPU memory, or the RAM Linux reports as MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not a KV cache type: give 'auto' (the "
                         "model's dtype), 'fp8' (e4m3) or 'int8', each with a scale per token and head")


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, k_dims: tuple[int, int],
                 v_dims: Optional[tuple[int, int]], dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto"):
        check_kv_cache_dtype(kv_cache_dtype)
        self.block_size, self.num_blocks, self.kv_cache_dtype = block_size, num_blocks, kv_cache_dtype
        self.dtype = dtype                   # the model's (the values' own dtype when not quantized)
        # CPU: unwritten pages cost nothing and unwritten slots are never read (module docstring)
        new = torch.empty if torch.device(device).type == "cpu" else torch.zeros
        cache_dtype = KV_CACHE_DTYPES.get(kv_cache_dtype, dtype)
        self.k_caches = [new(num_blocks, block_size, *k_dims, dtype=cache_dtype, device=device)
                         for _ in range(num_layers)]
        self.v_caches = [None if v_dims is None else
                         new(num_blocks, block_size, *v_dims, dtype=cache_dtype, device=device)
                         for _ in range(num_layers)]

        def scales(dims: Optional[tuple[int, int]]) -> Optional[torch.Tensor]:
            if kv_cache_dtype == "auto" or dims is None:
                return None
            return new(num_blocks, block_size, dims[0], dtype=SCALE_DTYPE, device=device)
        self.k_scales = [scales(k_dims) for _ in range(num_layers)]
        self.v_scales = [scales(v_dims) if v_dims is not None else k for k in self.k_scales]

    def layers(self) -> list[tuple[Optional[torch.Tensor], ...]]:
        """Per layer (k_cache, v_cache), and for a quantized cache (k_cache, v_cache, k_scale, v_scale):
        the model's forward passes each layer's tuple on as it is."""
        if self.kv_cache_dtype == "auto":
            return list(zip(self.k_caches, self.v_caches))
        return list(zip(self.k_caches, self.v_caches, self.k_scales, self.v_scales))

    @staticmethod
    def bytes_per_token(num_layers: int, k_dims: tuple[int, int], v_dims: Optional[tuple[int, int]],
                        dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """Bytes one token takes in every layer: its K/V values, and for fp8 / int8 their float16 scales
        (one per head)."""
        check_kv_cache_dtype(kv_cache_dtype)
        rows = [k_dims] + ([] if v_dims is None else [v_dims])
        values = sum(h * d for h, d in rows) * KV_CACHE_DTYPES.get(kv_cache_dtype, dtype).itemsize
        scales = sum(h for h, _ in rows) * SCALE_DTYPE.itemsize if kv_cache_dtype != "auto" else 0
        return num_layers * (values + scales)


def pool_tokens(device: torch.device, per_token: int, max_context: int, max_num_seqs: int,
                kv_memory: Optional[int] = None) -> int:
    """Tokens of KV cache to allocate when no token count is given (module docstring: the rule)."""
    if kv_memory is not None:
        budget = kv_memory
    elif device.type == "cuda":
        budget = int(available_bytes(device) * GPU_FREE_FRACTION)
    else:
        budget = DEFAULT_CPU_KV_BYTES
    return min(budget // per_token, max_context * max_num_seqs)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_pool_fits(device: torch.device, num_bytes: int) -> None:
    """A clear error, before allocating, when the pool cannot be held in the memory free now."""
    avail = available_bytes(device)
    if num_bytes > avail:
        where = "free GPU memory" if device.type == "cuda" else "RAM available (MemAvailable)"
        raise ValueError(f"the KV cache needs {_size(num_bytes)} but only {_size(avail)} of {where} "
                         f"is left on {device}: lower --kv-cache-memory (LLM "
                         "kv_cache_memory=, e.g. '1GiB'), --max-kv-tokens or --max-num-seqs")
