"""Every hot op of the engine as a `torch.library` custom op.

The body of each op is its *reference*: plain PyTorch that runs on any device and is the readable
statement of what the op computes (see the op contracts in the README). When the CUDA extension is
built, `tinyinfer.kernels` registers a hand-written kernel for the `cuda` dispatch key of the same op,
so callers never choose: `ops.paged_attention(...)` runs the kernel on a GPU and the reference elsewhere.
Tests compare the two on the same inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# store_kv: write the new tokens' K/V rows into their cache slots
# ----------------------------------------------------------------------------------------------

def store_kv_reference(k: Tensor, v: Optional[Tensor], k_cache: Tensor, v_cache: Optional[Tensor],
                       slot_mapping: Tensor) -> None:
    # k (T, Hkv, D), v (T, Hkv, Dv); caches (NB, BS, Hkv, D|Dv); slot -1 = padding, skipped.
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    if v is not None:
        v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


@torch.library.custom_op("tinyinfer::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(k: Tensor, v: Optional[Tensor], k_cache: Tensor, v_cache: Optional[Tensor],
             slot_mapping: Tensor) -> None:
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)


@store_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None  # mutates the caches in place; nothing to allocate under tracing / graph capture


# ----------------------------------------------------------------------------------------------
# paged_attention: causal attention of T new queries over their sequences' paged K/V
# ----------------------------------------------------------------------------------------------

def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    # q (T, Hq, D); k_cache (NB, BS, Hkv, D); v_cache (NB, BS, Hkv, Dv) -- possibly a strided view of
    # k_cache (MLA). Sequence b owns queries qsl[b]..qsl[b+1]-1 and seq_lens[b] cached tokens
    # including them. Walks the block table like the kernel does: position p lives in block
    # block_tables[b, p // BS] at offset p % BS. Rows at or past qsl[B] are padding -> zeros.
    T, Hq, _ = q.shape
    block_size, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    group = Hq // Hkv
    out = q.new_zeros(T, Hq, Dv)
    lens, starts = seq_lens.tolist(), query_start_loc.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[b, :(seq_len + block_size - 1) // block_size].long()
        phys_block, offset = blocks[pos // block_size], pos % block_size
        k = k_cache[phys_block, offset].float()                       # (L, Hkv, D)
        v = v_cache[phys_block, offset].float()                       # (L, Hkv, Dv)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)          # (Hq, L, D)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)          # (Hq, L, Dv)
        qb = q[q0:q1].float().transpose(0, 1)                         # (Hq, q_len, D)
        scores = (qb @ k.transpose(1, 2)) * scale                      # (Hq, q_len, L)
        q_pos = seq_len - q_len + torch.arange(q_len, device=q.device)
        causal = pos[None, :] <= q_pos[:, None]                       # (q_len, L)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def paged_attention_batched(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    # The reference above, for every sequence at once (no Python loop over the batch: on a CPU that
    # loop was half of a batch-16 decode step). Sequences are padded to the longest context L and
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


@torch.library.custom_op("tinyinfer::paged_attention", mutates_args=())
def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    return paged_attention_batched(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                   scale)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


# ----------------------------------------------------------------------------------------------
# int4_linear: y = x @ dequant(W).T with W in 4 bits (layout: tinyinfer/quant.py, cuda/int4.cuh)
# ----------------------------------------------------------------------------------------------

def int4_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                          group_size: int) -> Tensor:
    # x (M, K); qweight (N/16, Kp/64, 32, 4) int32; scales, zeros (N/16, Kp/G, 16) -> y (M, N).
    # Unpacks the kernel layout itself (the same one the CUDA kernel reads), W = (q - z) * s in fp32.
    from tinyinfer.quant import dequantize_kernel_layout     # quant.py imports this module
    w = dequantize_kernel_layout(qweight, scales, zeros, x.shape[-1])              # (N, K) float32
    return (x.float() @ w.T).to(x.dtype)


@torch.library.custom_op("tinyinfer::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int
                ) -> Tensor:
    return int4_linear_reference(x, qweight, scales, zeros, group_size)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0] * 16)


# ----------------------------------------------------------------------------------------------
# Prefill over fresh K/V (no cached prefix): per-sequence causal SDPA. Not a custom op: it reads
# no cache, and SDPA already dispatches to fused kernels on a GPU.
# ----------------------------------------------------------------------------------------------

def prefill_attention(q: Tensor, k: Tensor, v: Tensor, query_start_loc: list[int], scale: float
                      ) -> Tensor:
    # q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv); each sequence attends causally to itself only.
    Hq, Hkv = q.shape[1], k.shape[1]
    out = q.new_empty(q.shape[0], Hq, v.shape[-1])
    for q0, q1 in zip(query_start_loc[:-1], query_start_loc[1:]):
        if q1 == q0:
            continue
        qs, ks, vs = (t[q0:q1].transpose(0, 1) for t in (q, k, v))   # (H, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=Hq != Hkv)
        out[q0:q1] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Fused decode-path ops (cuda/fused_norm.cu, cuda/rope_store_kv.cu): fewer, fuller launches.
# Each reference repeats the unfused model math op for op, so on a CPU the fused model computes
# exactly what the unfused one did (tests/test_fused_ops.py checks that bit for bit).
# ----------------------------------------------------------------------------------------------

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x (..., d); weight (d,). Normalise in float32, round to the model dtype, then scale by the
    # weight in that dtype (Llama's order of operations: it decides the last bit in bf16).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@torch.library.custom_op("tinyinfer::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def fused_add_rmsnorm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor]:
    # x, residual (T, d): a sublayer's output and the residual stream before it. Returns
    # (rms_norm(x + residual), x + residual): the next sublayer's input and the new stream.
    new_residual = x + residual                                          # (T, d) model dtype
    return rms_norm_reference(new_residual, weight, eps), new_residual


@torch.library.custom_op("tinyinfer::fused_add_rmsnorm", mutates_args=())
def fused_add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float
                      ) -> tuple[Tensor, Tensor]:
    return fused_add_rmsnorm_reference(x, residual, weight, eps)


@fused_add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    stream_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(stream_dtype, weight.dtype)),
            x.new_empty(x.shape, dtype=stream_dtype))


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (T, H, D); cos, sin (T, D). Hugging Face "rotate_half" layout: dim i pairs with i + D/2,
    # x * cos + cat(-x[D/2:], x[:D/2]) * sin.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rope_store_kv_reference(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                            k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
                            ) -> tuple[Tensor, Tensor]:
    # q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv); cos, sin (T, D): the step's rotary table rows.
    # Rotates q and k, writes rotated k and v into their cache slots (-1 = padding, skipped) and
    # returns (rotated q, rotated k): attention reads q, and fresh prefill attends over k directly.
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q, k


@torch.library.custom_op("tinyinfer::rope_store_kv", mutates_args=("k_cache", "v_cache"))
def rope_store_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                  v_cache: Tensor, slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
    return rope_store_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


@rope_store_kv.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


# The hand-written CUDA kernels override the references above for the `cuda` dispatch key. Registering
# compiles nothing: the extension is built or loaded at the first call on a CUDA tensor.
from tinyinfer.kernels import register_cuda_kernels  # noqa: E402  (needs the ops defined above)

register_cuda_kernels()
