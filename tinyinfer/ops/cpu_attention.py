"""Paged attention on a CPU: the `cpu` kernel of ops.paged_attention (registered by ops/cpu.py).

The reference walks the batch one sequence at a time; on a CPU that loop was half of a batch-16 decode
step. This path reads every sequence's K/V through its block table at once (PagedAttention's
block-table read, Kwon et al., SOSP 2023), pads to the longest context and masks; sequences of very
different lengths run as a few such batches of similar length. Same contract, tested against the
reference and float64 (tests/test_paged_attention.py, tests/test_chunked_prefill.py,
tests/test_cuda_graphs.py for one padded group).

What a step's layers share is worked out once per step (`_plan`): which cache slot each padded
position reads, the mask, the length groups. Positions past a sequence's end read the sequence's own
position 0 (a slot it wrote) and are masked out of the scores, so no slot outside the sequence is
ever read -- unused slots may hold anything, NaN included -- and the gathered K/V need no cleaning.
Per layer what remains is one row gather each for K and V (a copy of the context, ~Hkv * D * 4
bytes a token) and one SDPA call; docs/cpu-performance.md measures what that copy costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from tinyinfer.ops.kv_quant import select_slots


def length_groups(lens: list[int], slack: int = 64) -> list[list[int]]:
    """Sequence indices grouped by context length, shortest first: a group's longest context is at
    most twice its shortest + `slack`, so padding a group to its longest wastes little."""
    groups: list[list[int]] = []
    for b in sorted(range(len(lens)), key=lens.__getitem__):
        if groups and lens[b] <= 2 * lens[groups[-1][0]] + slack:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


@dataclass
class _Group:
    """Sequences padded together: B sequences, contexts padded to L, query runs to Q."""
    B: int
    L: int
    Q: int
    decode: bool                  # one query per sequence, rows 0..B-1 of the group's q
    slots: Tensor                 # (B * L,) int64: the cache slot each padded position reads
    key_mask: Optional[Tensor]    # (B, L) bool, None when every sequence is L long
    attn_mask: Optional[Tensor]   # SDPA mask: decode (B, 1, 1, L) or None; else (B, 1, Q, L)
    q_index: Optional[tuple[Tensor, Tensor, Tensor]]   # not decode: real rows, their (b, i)
    rows: Optional[Tensor]        # the group's rows of the whole batch (None: one group, all rows)
    seq_index: Optional[Tensor]   # the group's sequences (None: one group)


def pad_group(block_tables: Tensor, seq_lens: Tensor, qsl: Tensor, lens: list[int], starts: list[int],
              block_size: int) -> Optional[_Group]:
    B, dev = len(lens), seq_lens.device
    L = max(lens, default=0)
    Q = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    if L == 0 or Q == 0:
        return None
    pos = torch.arange(L, device=dev)
    key_mask = None if min(lens) == L else pos[None, :] < seq_lens[:, None]           # (B, L)
    cols = pos // block_size if key_mask is None else torch.where(key_mask, pos // block_size, 0)
    blocks = block_tables.long().gather(1, cols.expand(B, L))                         # (B, L)
    offsets = pos % block_size if key_mask is None else torch.where(key_mask, pos % block_size, 0)
    if 0 in lens:                                  # an empty sequence reads (and masks) slot 0
        blocks = torch.where(seq_lens[:, None] > 0, blocks, 0)
    slots = (blocks * block_size + offsets).view(-1)                                  # (B * L,)
    decode = Q == 1 and starts[B] == B
    if decode:
        mask = None if key_mask is None else key_mask[:, None, None, :]                # (B, 1, 1, L)
        return _Group(B, L, Q, True, slots, key_mask, mask, None, None, None)
    # Query row t of sequence b is its i-th query, i = t - qsl[b]; rows past qsl[B]: padding.
    rows = torch.arange(starts[B], device=dev)
    starts_t = qsl.long()
    b_of = torch.searchsorted(starts_t[1:], rows, right=True)                         # (T_real,)
    i_of = rows - starts_t[b_of]
    # Query i of sequence b sits at position len_b - q_len_b + i and sees keys 0 .. there.
    q_lens = starts_t[1:] - starts_t[:-1]                                             # (B,)
    q_pos = seq_lens[:, None] - q_lens[:, None] + torch.arange(Q, device=dev)[None, :]  # (B, Q)
    mask = (pos[None, None, :] <= q_pos[:, :, None])[:, None]                         # (B, 1, Q, L)
    return _Group(B, L, Q, False, slots, key_mask, mask, (rows, b_of, i_of), None, None)


def _plan(block_tables: Tensor, seq_lens: Tensor, qsl: Tensor, block_size: int) -> list[_Group]:
    lens, starts = seq_lens.tolist(), qsl.tolist()                      # one host read each
    groups = length_groups(lens)
    if len(groups) == 1:
        g = pad_group(block_tables, seq_lens, qsl, lens, starts, block_size)
        return [g] if g is not None else []
    plan = []
    for idx in groups:
        rows = [t for b in idx for t in range(starts[b], starts[b + 1])]
        if not rows:
            continue
        sub = [0]
        for b in idx:
            sub.append(sub[-1] + starts[b + 1] - starts[b])
        idx_t = torch.tensor(idx, device=seq_lens.device)
        g = pad_group(block_tables[idx_t], seq_lens[idx_t],
                   torch.tensor(sub, dtype=torch.int32, device=seq_lens.device),
                   [lens[b] for b in idx], sub, block_size)
        if g is not None:
            g.rows, g.seq_index = torch.tensor(rows, device=seq_lens.device), idx_t
            plan.append(g)
    return plan


# block_tables -> (seq_lens, query_start_loc, versions, block_size, plan): a step's metadata tensors
# are built once (engine/batch.py) and read by every layer, so the plan is made once per step.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: Tensor) -> int:
    # Inference tensors (the engine's per-step metadata) keep no version counter; they are never
    # written after they are built.
    return -1 if t.is_inference() else t._version


def step_plan(block_tables: Tensor, seq_lens: Tensor, qsl: Tensor, block_size: int) -> list[_Group]:
    key = (seq_lens, qsl, tuple(_version(t) for t in (block_tables, seq_lens, qsl)), block_size)
    hit = _PLANS.get(block_tables)
    if hit is not None and hit[0] is key[0] and hit[1] is key[1] and hit[2:4] == key[2:]:
        return hit[4]
    plan = _plan(block_tables, seq_lens, qsl, block_size)
    _PLANS[block_tables] = (*key, plan)
    return plan


def attend_group(g: _Group, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float,
                 k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
    """The group's output rows: decode (B, Hq, Dv), else (T_real, Hq, Dv), float32. A quantized
    cache's rows are dequantized as they are gathered (ops/kv_quant.py)."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    k = select_slots(k_cache, k_scale, g.slots).view(g.B, g.L, Hkv, D)
    v = select_slots(v_cache, v_scale, g.slots).view(g.B, g.L, Hkv, Dv)
    if g.decode:
        # The query sits at position len - 1 and sees exactly the sequence's keys. The query heads of
        # one KV head then share keys and mask: fold them into the query axis, so K/V are not
        # expanded to every query head (MQA and MLA: 1 KV head for all of them).
        qh = q[:g.B].float().view(g.B, Hkv, Hq // Hkv, D)                 # (B, Hkv, group, D)
        o = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=g.attn_mask, scale=scale)
        return o.reshape(g.B, Hq, Dv)
    rows, b_of, i_of = g.q_index
    qp = q.new_zeros(g.B, g.Q, Hq, D, dtype=torch.float32)
    qp[b_of, i_of] = q[rows].float()
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=g.attn_mask, scale=scale, enable_gqa=Hq != Hkv)
    return o.transpose(1, 2)[b_of, i_of]                                   # (T_real, Hq, Dv)


def paged_attention_grouped(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                            k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None
                            ) -> Tensor:
    # The ops.paged_attention contract (ops/reference.py) for a whole batch: per group of similar
    # context lengths, one padded, masked SDPA over the K/V rows gathered through the block tables.
    T, Hq, _ = q.shape
    Dv = v_cache.shape[-1]
    plan = step_plan(block_tables, seq_lens, query_start_loc, k_cache.shape[1])
    if len(plan) == 1 and plan[0].rows is None and plan[0].decode and T == plan[0].B:
        return attend_group(plan[0], q, k_cache, v_cache, scale, k_scale, v_scale).to(q.dtype)
    out = q.new_zeros(T, Hq, Dv)                                          # padding rows stay zero
    for g in plan:
        qg = q if g.rows is None else q[g.rows]
        o = attend_group(g, qg, k_cache, v_cache, scale, k_scale, v_scale).to(q.dtype)
        if g.rows is not None:
            out[g.rows] = o
        elif g.decode:
            out[:g.B] = o
        else:
            out[g.q_index[0]] = o
    return out
