"""The FP8 KV cache's scales, one per (layer, KV head) for K and for V, calibrated once at load.

Why calibrated, and why at load (docs/kv-cache.md): e4m3 holds |x| up to 448 with the same relative
step (2^-3) from 2^-6 up, so a scale only has to keep a head's values under 448 * s -- a fixed s = 1
clips models whose K reaches the hundreds (Qwen2's K bias). Calibrating from each request's prompt
would tie a block's bytes to whichever prompt came first, and a cached block's scale must never change
after it is written (prefix caching shares it). So the engine runs one prefill of a fixed text through
the model before it serves anything, with a temporary model-dtype cache, and sets
    s = max(amax * HEADROOM / 448, 2^-14)      (amax over that text's tokens and the head's dims)
for every layer and head; it never changes afterwards, so every run of the same engine options writes
the same bytes for the same tokens. HEADROOM = 4 leaves room for text whose K/V exceed the calibration
text's (e4m3 saturates at 448 * s; the clamp is in the write) and costs 2 of e4m3's ~17 binades at the
bottom, where values are below amax / 2^9 and weigh nothing in a dot product.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.ops.kv_quant import FP8_MAX, MIN_SCALE, SCALE_DTYPE

HEADROOM = 4.0

# A fixed calibration text (prose, numbers, code, dialogue), written for this purpose.
CALIBRATION_TEXT = (
    "The harbour was quiet before dawn. Three fishing boats came in at 5:40, their holds full of "
    "mackerel, and the market opened twenty minutes later. Prices rose from 2.10 to 3.75 a kilo by "
    "noon; by evening they had fallen back to 2.40.\n\n"
    "Q: A train leaves at 9:15 and travels 168 km at 84 km/h. When does it arrive?\n"
    "A: 168 / 84 = 2 hours, so it arrives at 11:15.\n\n"
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n\n"
    "\"Are you coming tomorrow?\" she asked. \"Only if the bridge is open,\" he said, folding the map. "
    "The committee will meet on 14 March to review the budget, the new library wing and the proposal "
    "to extend the cycle path along the river to the old mill.")


def fallback_ids(vocab_size: int, n: int = 256) -> list[int]:
    """Token ids when no tokenizer text is given (a runner built without one): a fixed spread."""
    return [(7919 * i + 13) % vocab_size for i in range(n)]


@torch.inference_mode()
def calibrate_fp8(model: torch.nn.Module, kv: PagedKVCache, token_ids: Sequence[int]) -> None:
    """Set kv's fp8 scales (k_scales / v_scales, (Hkv,) float16 per layer) from one prefill of
    token_ids through `model` (a tensor-parallel rank: every rank runs it, with the same ids)."""
    ids = [int(t) for t in token_ids][:model.cfg.max_context]
    n, bs = len(ids), kv.block_size
    dev = kv.k_caches[0].device
    blocks = -(-n // bs)
    k_dims = tuple(kv.k_caches[0].shape[2:])
    v_dims = None if kv.v_caches[0] is None else tuple(kv.v_caches[0].shape[2:])
    tmp = PagedKVCache(len(kv.k_caches), blocks, bs, k_dims, v_dims, kv.dtype, dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        max_q_len=n, query_start_loc_host=[0, n], seq_lens_host=[n], prefill=True)
    model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), meta, tmp.layers())

    def scale(cache: torch.Tensor) -> torch.Tensor:
        amax = cache.flatten(0, 1)[:n].float().abs().amax(dim=(0, 2))              # (Hkv,)
        return (amax * HEADROOM / FP8_MAX).clamp(MIN_SCALE, 65504.0).to(SCALE_DTYPE)
    for i, (k, v) in enumerate(zip(tmp.k_caches, tmp.v_caches)):
        kv.k_scales[i].copy_(scale(k))       # in place: MLA's v_scales are the same tensors
        if v is not None:
            kv.v_scales[i].copy_(scale(v))
