"""Test helpers of the fused decode-path ops (tests/test_fused_ops.py on the CPU, tests/test_cuda_fused.py
on a GPU): per-dtype tolerances, bit views, the rotary table and the RoPE + K/V
write inputs (q, k, v as views of one projection output, NaN-poisoned caches, ~1/4 padding slots), and
a NaN-poisoned allocator for outputs."""
from __future__ import annotations

import torch

from tinyinfer.layers.rotary import RotaryEmbedding, default_inv_freq

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# RMSNorm output: the kernel sums squares in another order, so 1/rms may differ from the reference's
# in the last fp32 bit; y is rounded twice (normalised value, then times weight), as the reference
# rounds it, and each rounding may then land one ulp apart: allow two ulps relative.
NORM_TOL = {dtype: dict(atol=TOL[dtype]["atol"], rtol=max(TOL[dtype]["rtol"], 2 * torch.finfo(dtype).eps))
            for dtype in DTYPES}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def rope_table(T: int, D: int, dtype, device, seed: int, max_pos: int = 4096):
    """Random positions, the inverse frequencies, and the rotary table (max_pos, D) in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    inv_freq = default_inv_freq(10000.0, D)
    rotary = RotaryEmbedding(inv_freq, max_pos, dtype, torch.device(device))
    return positions, inv_freq, rotary.cos_sin_cache


def rope_inputs(T, Hq, Hkv, D, BS, dtype, device, seed, num_blocks=9):
    """q, k, v as views into one fused projection output (as the model passes them), NaN caches,
    distinct random slots with about a quarter padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(device, dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    positions, _, table = rope_table(T, D, dtype, device, seed)
    k_cache = torch.full((num_blocks, BS, Hkv, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full((num_blocks, BS, Hkv, D), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * BS, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.25] = -1
    return q, k, v, table, positions, k_cache, v_cache, slots.to(device)


def poison_free_memory(*tensors_like: torch.Tensor) -> None:
    """Leave NaN in freed allocator blocks of these tensors' sizes, so an output the kernel allocates
    next most likely starts as NaN: an element it forgets to write then shows."""
    poison = [torch.full_like(t, float("nan")) for t in tensors_like]
    del poison                               # back to the caching allocator, NaN inside


# hidden sizes: the demo model's, Llama-7B's, 8192, one past the register cache for fp32
# (12288 fp32 = 3072 vectors > 512 threads x 4), one past it for 16-bit (20480 bf16), and odd
# sizes that take the unvectorised path (1001, 4100 fp16 = 8200 bytes, not a multiple of 16).
