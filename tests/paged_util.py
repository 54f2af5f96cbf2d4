"""Test helpers for paged attention: a batch built the hard way (shuffled block tables over a pool much
larger than needed, NaN in every slot no sequence owns, -1 past each table's last block, varlen
queries, padding rows) and the contract evaluated directly in float64; and a model's logits
teacher-forced one decode step at a time through its paged cache."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinyinfer.engine.kv_cache import PagedKVCache
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.models.transformer import Transformer


# Batches every CPU path of the op is checked on. name: (seq_lens, q_lens, hq, hkv, d, dv, bs, mla)
CPU_CASES = {
    "decode_gqa": ([37, 5, 64, 1], [1, 1, 1, 1], 8, 2, 16, 16, 8, False),
    "verify_q16_mha": ([40, 16, 77], [16, 16, 3], 4, 4, 8, 8, 16, False),
    "varlen_with_empty_sequences": ([20, 0, 33, 9, 0], [4, 0, 7, 9, 0], 6, 3, 8, 8, 4, False),
    "mqa_block32": ([70, 33], [2, 5], 4, 1, 32, 32, 32, False),
    "mla_latent_view": ([30, 51], [1, 4], 16, 1, 576, 512, 16, True),
}


@dataclass
class Batch:
    q: torch.Tensor             # (T, Hq, D)
    k_cache: torch.Tensor       # (NB, BS, Hkv, D)
    v_cache: torch.Tensor       # (NB, BS, Hkv, Dv), possibly a view of k_cache
    block_tables: torch.Tensor  # (B, MB) int32, -1 past each sequence's blocks
    seq_lens: torch.Tensor      # (B,) int32
    query_start_loc: torch.Tensor  # (B+1,) int32
    keys: list[torch.Tensor]    # per sequence (L, Hkv, D), as written
    values: list[torch.Tensor]  # per sequence (L, Hkv, Dv)
    scale: float

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale)


def make_batch(seq_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, dv: int, bs: int,
               dtype: torch.dtype, device: str = "cpu", pad_rows: int = 3, pool_blocks: int | None = None,
               mla: bool = False, seed: int = 0, strided: bool = False) -> Batch:
    gen = torch.Generator(device=device).manual_seed(seed)  # data made where it is used: fast on a GPU
    blocks_needed = [math.ceil(n / bs) for n in seq_lens]
    nb = pool_blocks or 2 * sum(blocks_needed) + 5
    mb = max(blocks_needed + [1]) + 2  # spare table columns hold -1
    perm = torch.randperm(nb, generator=gen, device=device).tolist()  # shuffled physical blocks, none shared
    width = d + 16 if strided else d  # a wider base tensor makes the cache a strided view
    k_base = torch.full((nb, bs, hkv, width), float("nan"), dtype=dtype, device=device)
    v_base = None if mla else torch.full((nb, bs, hkv, dv + 8 if strided else dv), float("nan"), dtype=dtype,
                                         device=device)
    tables = torch.full((len(seq_lens), mb), -1, dtype=torch.int32, device=device)
    keys, values = [], []
    for b, n in enumerate(seq_lens):
        blocks = [perm.pop() for _ in range(blocks_needed[b])]
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, hkv, d, generator=gen, device=device).to(dtype)  # unit scale
        v = k[..., :dv] if mla else torch.randn(n, hkv, dv, generator=gen, device=device).to(dtype)
        pos = torch.arange(n, device=device)
        blk, off = torch.tensor(blocks, dtype=torch.long, device=device)[pos // bs], pos % bs
        k_base[blk, off, :, :d] = k
        if not mla:
            v_base[blk, off, :, :dv] = v
        keys.append(k)
        values.append(v)
    k_cache = k_base[..., :d]
    v_cache = k_cache[..., :dv] if mla else v_base[..., :dv]
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    T = starts[-1] + pad_rows
    q = torch.randn(T, hq, d, generator=gen, device=device).to(dtype)
    scale = 0.7 / math.sqrt(d)  # deliberately not 1/sqrt(D): the op must use the scale it is given
    return Batch(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                 torch.tensor(starts, dtype=torch.int32, device=device), keys, values, scale)


def dense_float64(batch: Batch) -> torch.Tensor:
    """The contract evaluated directly: per sequence, causal softmax(q k^T * scale) v in float64."""
    T, hq, _ = batch.q.shape
    dv = batch.v_cache.shape[-1]
    hkv = batch.k_cache.shape[2]
    out = torch.zeros(T, hq, dv, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for b, n in enumerate(batch.seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        for i, t in enumerate(range(q0, q1)):
            visible = n - (q1 - q0) + i + 1  # keys 0 .. position of query i
            for h in range(hq):
                kv = h // (hq // hkv)
                k = batch.keys[b][:visible, kv].cpu().double()
                v = batch.values[b][:visible, kv].cpu().double()
                w = torch.softmax((k @ batch.q[t, h].cpu().double()) * batch.scale, dim=0)
                out[t, h] = w @ v
    return out


def teacher_forced(llm, ids: list[int], prefix: int, block_size: int = 16) -> torch.Tensor:
    """Logits of every position of `ids`: `prefix` tokens as one prefill, then one decode step per
    token, over a fresh paged cache with shuffled blocks -- block 0 among them, so slot 0 is written
    and read like any other. Returns (len(ids), vocab) float32 on the CPU."""
    cfg, bs, dev = llm.config, block_size, llm.device
    k_dims, v_dims = Transformer.kv_dims(cfg)
    used = (len(ids) + bs - 1) // bs
    n_blocks = used + 3
    rest = (torch.randperm(n_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1).tolist()
    at = min(1, used - 1)                              # block 0 second (first for a one-block prompt)
    table = torch.tensor((rest[:at] + [0] + rest[at:])[:used], dtype=torch.int32, device=dev)
    kv = PagedKVCache(cfg.num_layers, n_blocks, bs, k_dims, v_dims, llm.dtype, dev)
    out = []
    steps = [(0, prefix)] + [(i, i + 1) for i in range(prefix, len(ids))]
    with torch.inference_mode():
        for a, b in steps:
            pos = torch.arange(a, b, device=dev)
            meta = AttentionMetadata(
                slot_mapping=table[pos // bs].long() * bs + pos % bs, block_tables=table[None],
                seq_lens=torch.tensor([b], dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor([0, b - a], dtype=torch.int32, device=dev),
                max_q_len=b - a, query_start_loc_host=[0, b - a], seq_lens_host=[b], prefill=a == 0)
            hidden = llm.model(torch.tensor(ids[a:b], device=dev), pos, meta, kv.layers())
            out.append(llm.model.compute_logits(hidden))
    return torch.cat(out).float().cpu()
