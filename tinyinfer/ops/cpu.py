"""CPU kernels: faster CPU implementations of ops whose reference is written for clarity, registered for
the `cpu` dispatch key of the op (as ops/cuda.py registers the CUDA kernels for `cuda`).

paged_attention: the reference walks the batch one sequence at a time; on a CPU that loop was half of a
batch-16 decode step. This path gathers every sequence's K/V through its block table at once, pads to
the longest context and masks (PagedAttention's block-table read, Kwon et al., SOSP 2023); sequences
of very different lengths run as a few such batches of similar length. Same contract, tested against
the reference (tests/test_paged_attention.py, tests/test_cuda_graphs.py).

int4_linear: the reference unpacks and dequantizes the whole weight on every call. On a CPU each layer's
weight is instead converted once and cached (keyed by its qweight tensor), in one of two forms:
  * bfloat16 activations: PyTorch's own CPU INT4 matmul, `aten._weight_int4pack_mm_for_cpu` (the CPU
    port of the "tinygemm" kernel; AVX-512 / AVX2 for bf16 -- its float32 path is scalar, slower than
    the reference), on the weight repacked by `aten._convert_weight_to_int4pack_for_cpu`:
        packed          uint8 (N, K/2)
        scale_and_zero  bf16 (K/G, N, 2)      the kernel computes w = (q - 8) * scale + zero in fp32
    Our zero conventions map onto it exactly in real numbers: an integer zero z gives
    zero = (8 - z) * s, a float offset m (GGUF Q4_1) gives zero = 8 * s + m. The operands are
    bfloat16, so scale and zero are rounded to 8 significant bits (our scales are fp16, 11) and y to
    bf16 (as the reference rounds it for a bf16 model). Bound, per output (tests/test_quant_cpu.py checks
    it against float64): |y - y_ref| <= 2^-8 * sum_k |x_k| (|(q_k - 8) s| + |zero|) + 2^-8 |y_ref|,
    the weight-level error of bfloat16, far inside INT4's own rounding error (s / 2 per weight).
    Memory: the 4-bit weights twice (kernel layout + this packing) and 4 bytes of scale/zero a group.
  * float32 / float16 activations: the weight dequantized once to float32 -- the reference's own
    values -- so y equals the reference bit for bit at float32 matmul speed, with float32 weight
    memory. (No exact INT4 matmul exists on the CPU for float32; loading/weights.py therefore runs
    INT4 models in bf16 on a CPU unless a dtype is asked for.)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from tinyinfer.ops import library
from tinyinfer.quant.format import dequantize_kernel_layout, from_kernel_layout


def paged_attention_batched(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    # reference.paged_attention for every sequence at once (no Python loop over the batch: on a CPU
    # that loop was half of a batch-16 decode step). Sequences are padded to the longest context L and
    # the longest query run Q; masks stand in for the per-sequence slicing. Same contract, tested
    # against the reference.
    T, Hq, D = q.shape
    block_size, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    B, dev = seq_lens.shape[0], q.device
    lens, qsl = seq_lens.tolist(), query_start_loc.tolist()             # one host read each
    L = max(lens, default=0)
    Q = max((b - a for a, b in zip(qsl, qsl[1:])), default=0)
    if L == 0 or Q == 0:
        return q.new_zeros(T, Hq, Dv)
    decode = Q == 1 and qsl[B] == B                     # one query per sequence: the common step
    full = min(lens) == L                               # every sequence L long: nothing to mask
    pos = torch.arange(L, device=dev)
    blocks = block_tables[:, pos // block_size]                         # (B, L)
    if not full:
        in_seq = pos[None, :] < seq_lens[:, None]                       # (B, L)
        # Entries past a sequence's last block may hold anything: read block 0 there, masked below.
        blocks = torch.where(in_seq, blocks, 0)
    slots = blocks.long() * block_size + pos % block_size               # (B, L)
    k = k_cache.flatten(0, 1)[slots].float()                            # (B, L, Hkv, D)
    v = v_cache.flatten(0, 1)[slots].float()                            # (B, L, Hkv, Dv)
    if not full:
        # Unused slots may hold NaN: masking adds -inf to a score (NaN stays NaN), P @ V has 0 x NaN.
        k = torch.where(in_seq[:, :, None, None], k, 0.0)
        v = torch.where(in_seq[:, :, None, None], v, 0.0)
    if decode:
        # The query sits at position len - 1 and sees exactly the sequence's keys. The query heads of
        # one KV head then share keys and mask: fold them into the query axis, so K/V are not
        # expanded to every query head (MQA and MLA: 1 KV head for all of them).
        qh = q[:B].float().view(B, Hkv, Hq // Hkv, D)                  # (B, Hkv, group, D)
        mask = None if full else in_seq[:, None, None, :]
        o = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale)
        o = o.reshape(B, 1, Hq, Dv)                                     # (B, Q = 1, Hq, Dv)
    else:
        # Query row t of sequence b is its i-th query, i = t - qsl[b]; rows past qsl[B]: padding.
        rows = torch.arange(T, device=dev)
        real = rows < qsl[B]
        starts = query_start_loc.long()
        b_of = torch.searchsorted(starts[1:], rows[real], right=True)   # (T_real,)
        i_of = rows[real] - starts[b_of]
        qp = q.new_zeros(B, Q, Hq, D, dtype=torch.float32)
        qp[b_of, i_of] = q[real].float()
        # Query i of sequence b sits at position len_b - q_len_b + i and sees keys 0 .. there.
        q_lens = starts[1:] - starts[:-1]                               # (B,)
        q_pos = seq_lens[:, None] - q_lens[:, None] + torch.arange(Q, device=dev)[None, :]  # (B, Q)
        mask = (pos[None, None, :] <= q_pos[:, :, None])[:, None]       # (B, 1, Q, L)
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        o = o.transpose(1, 2)                                           # (B, Q, Hq, Dv)
    if decode and T == B:
        return o.reshape(B, Hq, Dv).to(q.dtype)
    out = q.new_zeros(T, Hq, Dv)                                        # padding rows stay zero
    if decode:
        out[:B] = o.reshape(B, Hq, Dv)
    else:
        out[real] = o[b_of, i_of].to(q.dtype)
    return out


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


def paged_attention_grouped(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    # paged_attention_batched pads every sequence to the longest context: one long sequence among
    # short ones (a long prompt's last chunk beside decodes, after chunked prefill or a cached
    # prefix) multiplied the work by up to the batch size. Groups of similar length run one padded
    # batch each; rows are gathered per group and written back. Same contract.
    groups = length_groups(seq_lens.tolist())
    if len(groups) == 1:
        return paged_attention_batched(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                       scale)
    qsl = query_start_loc.tolist()
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[-1])     # padding rows stay zero
    for idx in groups:
        rows = [t for b in idx for t in range(qsl[b], qsl[b + 1])]
        starts = [0]
        for b in idx:
            starts.append(starts[-1] + qsl[b + 1] - qsl[b])
        if not rows:
            continue
        rows_t, idx_t = torch.tensor(rows, device=q.device), torch.tensor(idx, device=q.device)
        out[rows_t] = paged_attention_batched(
            q[rows_t], k_cache, v_cache, block_tables[idx_t], seq_lens[idx_t],
            torch.tensor(starts, dtype=torch.int32, device=q.device), scale)
    return out


# qweight -> (scales, zeros, qweight version, converted weights): each layer converted once per form.
_TINYGEMM: WeakIdKeyDictionary = WeakIdKeyDictionary()
_DEQUANTIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cached(cache: WeakIdKeyDictionary, qweight: Tensor, scales: Tensor, zeros: Tensor,
            convert: Callable[[], Any]) -> Any:
    hit = cache.get(qweight)
    if hit is not None and hit[0] is scales and hit[1] is zeros and hit[2] == qweight._version:
        return hit[3]
    value = convert()
    cache[qweight] = (scales, zeros, qweight._version, value)
    return value


def tinygemm_weights(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The kernel-layout INT4 weight (quant/format.py) in the CPU kernel's packing, cached per layer:
    -> (packed uint8 (N, K/2), scale_and_zero bf16 (K/G, N, 2))."""
    def convert() -> tuple[Tensor, Tensor]:
        q, s, z = from_kernel_layout(qweight, scales, zeros, k)        # (N, K), (N, K/G) x 2
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        s32 = s.float()
        zero = 8 * s32 + z.float() if z.is_floating_point() else (8 - z.float()) * s32  # (N, K/G)
        scale_and_zero = torch.stack([s32, zero], dim=-1).transpose(0, 1)             # (K/G, N, 2)
        return packed, scale_and_zero.to(torch.bfloat16).contiguous()
    return _cached(_TINYGEMM, qweight, scales, zeros, convert)


def int4_linear_cpu(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                    group_size: int) -> Tensor:
    # x (M, K) -> y (M, N) = x @ W.T; bf16: the CPU INT4 kernel, else the cached float32 weight
    # (module docstring: both forms, the zero conventions, the error bound).
    m, k = x.shape
    if x.dtype != torch.bfloat16:
        w = _cached(_DEQUANTIZED, qweight, scales, zeros,
                    lambda: dequantize_kernel_layout(qweight, scales, zeros, k))      # (N, K) fp32
        return (x.float() @ w.T).to(x.dtype)
    packed, scale_and_zero = tinygemm_weights(qweight, scales, zeros, k)
    if m == 0:
        return x.new_empty(0, packed.shape[0])
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size,
                                                     scale_and_zero)                  # (M, N) bf16


@functools.cache
def register_cpu_kernels() -> None:
    """Register the CPU paths for the `cpu` key of their ops (once per process)."""
    library.paged_attention.register_kernel("cpu")(paged_attention_grouped)
    library.int4_linear.register_kernel("cpu")(int4_linear_cpu)
