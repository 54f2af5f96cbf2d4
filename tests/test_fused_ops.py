"""The fused decode-path ops: rms_norm, fused_add_rmsnorm, rope_store_kv and silu_and_mul (tinyinfer/ops/).

On the CPU: each reference computes exactly what the unfused model math it replaced computed (written
out again here, as the model and attention had it), bit for bit in float32 and bf16, and agrees with an
independent float64 formula; the whole demo model, run fused, equals the unfused layer-by-layer
forward bit for bit. The CUDA kernels against these references: tests/test_cuda_fused.py.
"""
from __future__ import annotations

import pytest
import torch

from fused_util import TOL, bits, rope_inputs, rope_table
from hf_util import LLAMA
from tinyinfer import LLM, ops
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.layers.attention import AttentionMetadata, attend
from tinyinfer.layers.rotary import default_inv_freq, rope_parameters
from tinyinfer.ops import reference



def _unfused_rms_norm(x, weight, eps):
    # RMSNorm.forward as model.py wrote it before the fusion.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _step_cos_sin(positions, inv_freq, dtype):
    # The step's cos/sin as the model computed them before the rotary table (and as HF does):
    # freqs = positions x inv_freq in float32, cat(freqs, freqs), cos / sin, rounded to the dtype.
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]    # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                       # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _unfused_rope(x, cos, sin):
    # attention.py's apply_rope before the fusion: rotate_half.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


# ----------------------------------------------------------------------------------------------
# CPU: references == the unfused model math, and == independent float64 formulas
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_add_rmsnorm_reference_is_the_unfused_residual_add_then_norm_bit_for_bit(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(7, 96, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    y, new_residual = reference.fused_add_rmsnorm(x, residual, weight, 1e-5)
    stream = residual + x                               # DecoderLayer: x = x + sublayer(x)
    assert torch.equal(bits(new_residual), bits(stream))
    assert torch.equal(bits(y), bits(_unfused_rms_norm(stream, weight, 1e-5)))
    assert torch.equal(bits(reference.rms_norm(x, weight, 1e-5)), bits(_unfused_rms_norm(x, weight, 1e-5)))


def test_rms_norm_reference_matches_the_float64_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight = 3 * torch.randn(5, 1000, generator=gen), torch.randn(1000, generator=gen)
    x64, w64 = x.double(), weight.double()
    want = w64 * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_store_kv_from_the_table_is_per_step_rope_then_store_kv_bit_for_bit(dtype, seed):
    q, k, v, table, pos, k_cache, v_cache, slots = rope_inputs(23, 4, 2, 64, 16, dtype, "cpu", seed)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    cos, sin = _step_cos_sin(pos, default_inv_freq(10000.0, 64), dtype)   # as computed per step
    want_q, want_k = _unfused_rope(q, cos, sin), _unfused_rope(k, cos, sin)
    ops.store_kv(want_k, v, want_k_cache, want_v_cache, slots)
    got_q, got_k = ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots)
    assert torch.equal(bits(got_q), bits(want_q)) and torch.equal(bits(got_k), bits(want_k))
    # NaN-poisoned slots compare as bits too: padding (-1) and unused slots stay untouched.
    assert torch.equal(bits(k_cache), bits(want_k_cache))
    assert torch.equal(bits(v_cache), bits(want_v_cache))
    assert torch.isnan(k_cache).sum() == k_cache[0, 0].numel() * (k_cache.shape[0] * k_cache.shape[1]
                                                                 - int((slots >= 0).sum()))


def test_rope_reference_is_a_complex_rotation_of_each_half_pair(seed):
    # RoPE in the rotate_half layout = multiplying z_i = x[i] + i x[i + D/2] by exp(i * pos * inv_freq_i).
    T, H, D = 11, 3, 32
    positions, inv_freq, table = rope_table(T, D, torch.float32, "cpu", seed, max_pos=300)
    cos, sin = reference.rope_rows(table, positions)
    x = torch.randn(T, H, D)
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double())          # (T, H, D/2)
    angle = positions.double()[:, None] * inv_freq.double()[None, :]               # (T, D/2)
    rotated = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    want = torch.cat((rotated.real, rotated.imag), dim=-1)
    torch.testing.assert_close(reference.apply_rotary(x, cos, sin).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_and_mul_matches_the_float64_formula(dtype, seed):
    x = (3 * torch.randn(7, 2 * 96, generator=torch.Generator().manual_seed(seed))).to(dtype)
    g, u = x.double().chunk(2, dim=-1)
    want = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(ops.silu_and_mul(x).double(), want, msg=f"seed {seed}",
                               **TOL[dtype])


def test_fake_implementations_and_schemas_agree_with_the_references():
    x, residual, weight = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.rms_norm, (x, weight, 1e-5), test_utils=checks)
    torch.library.opcheck(ops.fused_add_rmsnorm, (x, residual, weight, 1e-5), test_utils=checks)
    torch.library.opcheck(ops.silu_and_mul, (torch.randn(3, 10),), test_utils=checks)
    args = rope_inputs(5, 4, 2, 8, 4, torch.float32, "cpu", seed=0, num_blocks=3)
    torch.library.opcheck(ops.rope_store_kv, args, test_utils=checks)


def _unfused_forward(model, input_ids, positions, meta, kv_caches):
    """Transformer.forward as it was before the fusions: separate residual adds and norms, cos/sin
    computed for the step, apply_rope then store_kv, silu(gate) * up as two ops."""
    x = model.embed_tokens(input_ids)
    cos, sin = _step_cos_sin(positions, rope_parameters(model.cfg)[1], x.dtype)
    T = x.shape[0]
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
        attn, ln = layer.attn, layer.input_layernorm
        q, k, v = attn.qkv_proj(_unfused_rms_norm(x, ln.weight, ln.eps)).split(attn.splits, dim=-1)
        q = _unfused_rope(q.view(T, attn.num_heads, attn.head_dim), cos, sin)
        k = _unfused_rope(k.view(T, attn.num_kv_heads, attn.head_dim), cos, sin)
        v = v.view(T, attn.num_kv_heads, attn.head_dim)
        reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = attend(q, k, v, k_cache, v_cache, meta, attn.scale)
        x = x + attn.o_proj(out.reshape(T, -1))
        ln, mlp = layer.post_attention_layernorm, layer.mlp
        gate, up = mlp.gate_up_proj(_unfused_rms_norm(x, ln.weight, ln.eps)).split(mlp.ffn, dim=-1)
        x = x + mlp.down_proj(torch.nn.functional.silu(gate) * up)
    return _unfused_rms_norm(x, model.norm.weight, model.norm.eps)


def _one_sequence_step(start: int, n: int, num_blocks: int) -> tuple[torch.Tensor, AttentionMetadata]:
    # One sequence owning blocks 0..num_blocks-1 in order; feeds positions start .. start+n-1.
    positions = torch.arange(start, start + n)
    return positions, AttentionMetadata(
        slot_mapping=positions.clone(), block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([start + n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_q_len=n,
        query_start_loc_host=[0, n], seq_lens_host=[start + n], prefill=start == 0)


@torch.inference_mode()
def test_fused_model_equals_the_unfused_forward_bit_for_bit_on_the_demo_checkpoint(seed, monkeypatch):
    # The references (the C++ CPU kernels off: their norms sum in another order, tests/test_cpu_kernels.py).
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    llm = LLM(LLAMA, device="cpu", dtype="float32")
    model, cfg = llm.model, llm.config
    BS, NB = 16, 4
    def caches():
        shape = (NB, BS, cfg.num_kv_heads, cfg.head_dim)
        return [(torch.full(shape, float("nan")), torch.full(shape, float("nan"))) for _ in model.layers]
    fused_kv, unfused_kv = caches(), caches()
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(seed))
    # Prefill 20 tokens (SDPA on fresh K/V), one decode token, then a 9-token verification step
    # (paged attention over the cache each fused op wrote).
    for start, n in [(0, 20), (20, 1), (21, 9)]:
        positions, meta = _one_sequence_step(start, n, NB)
        fused = model(ids[start:start + n], positions, meta, fused_kv)
        unfused = _unfused_forward(model, ids[start:start + n], positions, meta, unfused_kv)
        assert torch.equal(bits(fused), bits(unfused)), f"step at position {start} differs"
    for (fk, fv), (uk, uv) in zip(fused_kv, unfused_kv):
        assert torch.equal(bits(fk), bits(uk)) and torch.equal(bits(fv), bits(uv))
