"""The reference of every op: plain PyTorch that runs on any device and states what the op computes.

Each function here is the body of the custom op of the same name (ops/library.py) and the fallback of
its CUDA impl when the extension is missing or the shapes are outside the kernel's limits, so there is
exactly one reference per op. Kernels (CUDA, and the batched CPU paths of ops/cpu.py) are tested
against these. Contracts: docs/architecture.md ("The op contracts"). PagedAttention's cache layout is
Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention", SOSP 2023; RMSNorm is
Zhang & Sennrich 2019; SwiGLU is Shazeer 2020; RoPE is Su et al., "RoFormer", 2021, in Hugging Face's rotate_half layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyinfer.ops.int4_format import dequantize_kernel_layout
from tinyinfer.ops.kv_quant import gather_dequantized, is_quantized, store_quantized


def store_kv(k: Tensor, v: Optional[Tensor], k_cache: Tensor, v_cache: Optional[Tensor],
             slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
             v_scale: Optional[Tensor] = None) -> None:
    # k (T, Hkv, D), v (T, Hkv, Dv); caches (NB, BS, Hkv, D|Dv); slot s lives in block s // BS at
    # offset s % BS; slot -1 = padding, skipped. A quantized cache (fp8 / int8, ops/kv_quant.py)
    # stores the quantized rows and writes each row's scale into k_scale / v_scale (NB, BS, Hkv).
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if x is None:
            continue
        if is_quantized(cache):
            store_quantized(x[keep], cache, scale, blocks, offsets)
        else:
            cache[blocks, offsets] = x[keep].to(cache.dtype)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> Tensor:
    # q (T, Hq, D); k_cache (NB, BS, Hkv, D); v_cache (NB, BS, Hkv, Dv) -- possibly a strided view of
    # k_cache (MLA). Sequence b owns queries qsl[b]..qsl[b+1]-1 and seq_lens[b] cached tokens
    # including them; query i of b sits at position seq_lens[b] - q_len_b + i and attends causally
    # to keys 0..that. Position p lives in block block_tables[b, p // BS] at offset p % BS. Rows at or
    # past qsl[B] are padding -> zeros. Entries past a sequence's last block are never read. A
    # quantized cache is read as q * scale (ops/kv_quant.py).
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
        k = gather_dequantized(k_cache, k_scale, (phys_block, offset))  # (L, Hkv, D)
        v = gather_dequantized(v_cache, v_scale, (phys_block, offset))  # (L, Hkv, Dv)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)          # (Hq, L, D)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)          # (Hq, L, Dv)
        qb = q[q0:q1].float().transpose(0, 1)                         # (Hq, q_len, D)
        scores = (qb @ k.transpose(1, 2)) * scale                      # (Hq, q_len, L)
        q_pos = seq_len - q_len + torch.arange(q_len, device=q.device)
        causal = pos[None, :] <= q_pos[:, None]                       # (q_len, L)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, query_start_loc: list[int], scale: float
                      ) -> Tensor:
    # Fresh prompts, nothing cached before them: q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv); each
    # sequence attends causally to itself only. SDPA dispatches to fused kernels on a GPU, so this is
    # a plain function, not a custom op (it reads no cache).
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


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            seq_lens: list[int], query_start_loc: list[int], scale: float,
                            k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None
                            ) -> Tensor:
    # Long query runs over a cached prefix (a prompt after a shared prefix, a prefill chunk): the
    # paged_attention contract with host-side lengths. Per sequence, gather its K/V through the block
    # table once (whole blocks, then trim) and run SDPA with a bottom-right-aligned causal mask, which
    # dispatches to fused kernels on a GPU. Not a custom op: it takes host lists.
    T, Hq, _ = q.shape
    block_size, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    out = q.new_zeros(T, Hq, Dv)
    for b, seq_len in enumerate(seq_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        if q1 == q0:
            continue
        blocks = block_tables[b, :(seq_len + block_size - 1) // block_size].long()
        if is_quantized(k_cache):   # whole blocks dequantized to float32 (ops/kv_quant.py)
            k = gather_dequantized(k_cache, k_scale, (blocks,))
            v = gather_dequantized(v_cache, v_scale, (blocks,))
        else:
            k, v = k_cache[blocks], v_cache[blocks]
        k = k.flatten(0, 1)[:seq_len].transpose(0, 1)                     # (Hkv, L, D)
        v = v.flatten(0, 1)[:seq_len].transpose(0, 1)                     # (Hkv, L, Dv)
        n = q1 - q0
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]   # (n, L)
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k.to(q.dtype), v.to(q.dtype),
                                           attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        out[q0:q1] = o.transpose(0, 1)
    return out


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # x (..., K), weight (N, K), bias (N,) | None -> x @ weight.T + bias (..., N): torch's own matmul.
    return F.linear(x, weight, bias)


def refine_top_logits(hidden: Tensor, weight: Tensor, logits: Tensor, k: int) -> Tensor:
    # hidden (T, d) half precision; weight (V, d); logits (T, V) float32, the head's matmul in the model
    # dtype (its output rounded to 8 significant bits in bf16: logits in [16, 32) sit on a grid of
    # 1/8, coarser than the gaps that decide a greedy token). The k largest of each row are recomputed
    # from the same inputs with float32 products and sums (rounding is monotonic, so the float32
    # argmax is among them); the rest keep their rounding, whose probability mass is small.
    # docs/quality.md measures it: most of the bf16 path's KL vs float32 was this rounding.
    k = min(k, logits.shape[-1])
    out = logits.clone()
    for i in range(0, logits.shape[0], 256):                 # (256, k, d) gathered rows at a time
        idx = logits[i:i + 256].topk(k, dim=-1).indices                               # (t, k)
        exact = torch.einsum("td,tkd->tk", hidden[i:i + 256].float(), weight[idx].float())
        out[i:i + 256].scatter_(-1, idx, exact)
    return out


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    # x (M, K); qweight (N/16, Kp/64, 32, 4) int32; scales, zeros (N/16, Kp/G, 16) -> y (M, N).
    # W = (q - z) * s for uint8 zeros, q * s + z for floating zeros (a per-group offset: GGUF Q4_1's
    # minimum), in float32, unpacked from the same kernel layout the CUDA kernel reads.
    w = dequantize_kernel_layout(qweight, scales, zeros, x.shape[-1])              # (N, K) float32
    return (x.float() @ w.T).to(x.dtype)


def q8_dequantize(qs: Tensor, d: Tensor) -> Tensor:
    # GGUF Q8_0: qs (N, K) int8 levels, d (N, K/32) scales, w = d q per run of 32 -> (N, K) float32,
    # exact (d q has at most 8 + 11 significant bits).
    n, k = qs.shape
    return (qs.float().view(n, k // 32, 32) * d.float()[..., None]).view(n, k)


def q8_unpack(packed: Tensor, scales: Tensor, n: int) -> tuple[Tensor, Tensor]:
    # The q8_linear kernel's layout (layers/q8.py: pack_q8) -> GGUF's: packed (N/16, K/4, 16, 4) uint8
    # q + 128, scales (N/16, K/32, 16) -> qs (n, K) int8, d (n, K/32).
    g, k4 = packed.shape[:2]
    qs = (packed.int() - 128).to(torch.int8).permute(0, 2, 1, 3).reshape(g * 16, k4 * 4)
    return qs[:n], scales.permute(0, 2, 1).reshape(g * 16, -1)[:n]


def q8_linear(x: Tensor, packed: Tensor, scales: Tensor, n: int) -> Tensor:
    # x (M, K) @ W.T with W in Q8_0, packed as the kernel reads it -> (M, n) float32 (a head whose
    # logits stay float32); the activations unquantized (the kernel holds each run of 32 as two int8
    # levels, 15 bits: cpu/q8_linear.h).
    return x.float() @ q8_dequantize(*q8_unpack(packed, scales, n)).T


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x (..., d); weight (d,). Normalise in float32, round to the model dtype, then scale by the
    # weight in that dtype (Llama's order of operations: it decides the last bit in bf16).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # x, residual (T, d): a sublayer's output and the residual stream before it. Returns
    # (rms_norm(x + residual), x + residual): the next sublayer's input and the new stream.
    # A float32 stream under half-precision x (a CPU's, layers/norm.py): x is added in float32 and
    # the norm rounded once, to x's dtype (weight * x / rms(x) in float32).
    if residual.dtype == torch.float32 and x.dtype != torch.float32:
        stream = x.float() + residual                                    # (T, d) float32
        y = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * y).to(x.dtype), stream
    new_residual = x + residual                                          # (T, d) model dtype
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: Tensor) -> Tensor:
    # x (..., 2F) = [gate | up], the fused gate/up projection's output -> (..., F): SwiGLU's
    # activation as the two tensor ops it replaces (each rounds to the model dtype).
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (T, H, D); cos, sin (T, D). Rotate-half layout: dim i pairs with i + D/2,
    # x * cos + cat(-x[D/2:], x[:D/2]) * sin.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rope_rows(cos_sin_cache: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    # cos_sin_cache (P, D): row p = [cos(p f_0..f_{D/2-1}) | sin(...)] (attention scaling folded in);
    # positions (T,) -> cos, sin (T, D) in the rotate-half layout, cat(c, c) and cat(s, s).
    c, s = cos_sin_cache[positions].chunk(2, dim=-1)                     # (T, D/2) each
    return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)


def rope_store_kv(q: Tensor, k: Tensor, v: Tensor, cos_sin_cache: Tensor, positions: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                  k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor]:
    # q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv); positions (T,) int64 index the rotary table.
    # Rotates q and k, writes rotated k and v into their cache slots (-1 = padding, skipped) and
    # returns (rotated q, rotated k): attention reads q, and fresh prefill attends over k directly.
    cos, sin = rope_rows(cos_sin_cache, positions)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k
