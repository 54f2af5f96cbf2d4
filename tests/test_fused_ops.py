"""The fused decode-path ops: rms_norm, fused_add_rmsnorm and rope_store_kv (tinyinfer/ops/).

CPU: each reference computes exactly what the unfused model math it replaced computed (written out
again here, as the model and attention had it), bit for bit in float32 and bf16, and agrees with an
independent float64 formula; the whole demo model, run fused, equals the unfused layer-by-layer
forward bit for bit. CUDA: the kernels (cuda/fused_norm.cu, cuda/rope_store_kv.cu) against those
references on fresh random inputs, per-dtype tolerances, NaN-poisoned caches and outputs.
"""
from __future__ import annotations

import random

import pytest
import torch

from hf_util import LLAMA
from tinyinfer import LLM, ops
from tinyinfer.layers.attention import AttentionMetadata, attend
from tinyinfer.layers.rotary import RotaryEmbedding, default_inv_freq, rope_parameters
from tinyinfer.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# RMSNorm output: the kernel sums squares in another order, so 1/rms may differ from the reference's
# in the last fp32 bit; y is rounded twice (normalised value, then times weight), as the reference
# rounds it, and each rounding may then land one ulp apart: allow two ulps relative.
NORM_TOL = {dtype: dict(atol=TOL[dtype]["atol"], rtol=max(TOL[dtype]["rtol"], 2 * torch.finfo(dtype).eps))
            for dtype in DTYPES}


# Fresh inputs every run; the seed is in every test id that uses it ("...-seed1234]"): a failure names it.
FRESH_SEED = random.SystemRandom().randrange(2**31)


@pytest.fixture(params=[FRESH_SEED], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    return request.param


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


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


def _rope_table(T: int, D: int, dtype, device, seed: int, max_pos: int = 4096):
    """Random positions, the inverse frequencies, and the rotary table (max_pos, D) in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    inv_freq = default_inv_freq(10000.0, D)
    rotary = RotaryEmbedding(inv_freq, max_pos, dtype, torch.device(device))
    return positions, inv_freq, rotary.cos_sin_cache


def _rope_inputs(T, Hq, Hkv, D, BS, dtype, device, seed, num_blocks=9):
    """q, k, v as views into one fused projection output (as the model passes them), NaN caches,
    distinct random slots with about a quarter padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(device, dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    positions, _, table = _rope_table(T, D, dtype, device, seed)
    k_cache = torch.full((num_blocks, BS, Hkv, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full((num_blocks, BS, Hkv, D), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * BS, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.25] = -1
    return q, k, v, table, positions, k_cache, v_cache, slots.to(device)


# ----------------------------------------------------------------------------------------------
# CPU: references == the unfused model math, and == independent float64 formulas
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_add_rmsnorm_reference_is_the_unfused_residual_add_then_norm_bit_for_bit(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(7, 96, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    y, new_residual = ops.fused_add_rmsnorm(x, residual, weight, 1e-5)
    stream = residual + x                               # DecoderLayer: x = x + sublayer(x)
    assert torch.equal(_bits(new_residual), _bits(stream))
    assert torch.equal(_bits(y), _bits(_unfused_rms_norm(stream, weight, 1e-5)))
    assert torch.equal(_bits(ops.rms_norm(x, weight, 1e-5)), _bits(_unfused_rms_norm(x, weight, 1e-5)))


def test_rms_norm_reference_matches_the_float64_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight = 3 * torch.randn(5, 1000, generator=gen), torch.randn(1000, generator=gen)
    x64, w64 = x.double(), weight.double()
    want = w64 * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_store_kv_from_the_table_is_per_step_rope_then_store_kv_bit_for_bit(dtype, seed):
    q, k, v, table, pos, k_cache, v_cache, slots = _rope_inputs(23, 4, 2, 64, 16, dtype, "cpu", seed)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    cos, sin = _step_cos_sin(pos, default_inv_freq(10000.0, 64), dtype)   # as computed per step
    want_q, want_k = _unfused_rope(q, cos, sin), _unfused_rope(k, cos, sin)
    ops.store_kv(want_k, v, want_k_cache, want_v_cache, slots)
    got_q, got_k = ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots)
    assert torch.equal(_bits(got_q), _bits(want_q)) and torch.equal(_bits(got_k), _bits(want_k))
    # NaN-poisoned slots compare as bits too: padding (-1) and unused slots stay untouched.
    assert torch.equal(_bits(k_cache), _bits(want_k_cache))
    assert torch.equal(_bits(v_cache), _bits(want_v_cache))
    assert torch.isnan(k_cache).sum() == k_cache[0, 0].numel() * (k_cache.shape[0] * k_cache.shape[1]
                                                                 - int((slots >= 0).sum()))


def test_rope_reference_is_a_complex_rotation_of_each_half_pair(seed):
    # RoPE in the rotate_half layout = multiplying z_i = x[i] + i x[i + D/2] by exp(i * pos * inv_freq_i).
    T, H, D = 11, 3, 32
    positions, inv_freq, table = _rope_table(T, D, torch.float32, "cpu", seed, max_pos=300)
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
    args = _rope_inputs(5, 4, 2, 8, 4, torch.float32, "cpu", seed=0, num_blocks=3)
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
def test_fused_model_equals_the_unfused_forward_bit_for_bit_on_the_demo_checkpoint(seed):
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
        assert torch.equal(_bits(fused), _bits(unfused)), f"step at position {start} differs"
    for (fk, fv), (uk, uv) in zip(fused_kv, unfused_kv):
        assert torch.equal(_bits(fk), _bits(uk)) and torch.equal(_bits(fv), _bits(uv))


# ----------------------------------------------------------------------------------------------
# CUDA: kernels vs references
# ----------------------------------------------------------------------------------------------

def _poison_free_memory(*tensors_like: torch.Tensor) -> None:
    """Leave NaN in freed allocator blocks of these tensors' sizes, so an output the kernel allocates
    next most likely starts as NaN: an element it forgets to write then shows."""
    poison = [torch.full_like(t, float("nan")) for t in tensors_like]
    del poison                               # back to the caching allocator, NaN inside


# hidden sizes: the demo model's, Llama-7B's, 8192, one past the register cache for fp32
# (12288 fp32 = 3072 vectors > 512 threads x 4), one past it for 16-bit (20480 bf16), and odd
# sizes that take the unvectorised path (1001, 4100 fp16 = 8200 bytes, not a multiple of 16).
HIDDEN = [256, 4096, 8192, 12288, 20480, 1001, 4100]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("T", [1, 37])
def test_fused_add_rmsnorm_kernel_equals_reference(cuda_extension, T, hidden, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(T, hidden, generator=gen).to("cuda", dtype) for _ in range(2))
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to("cuda", dtype)
    want_y, want_residual = reference.fused_add_rmsnorm(x, residual, weight, 1e-5)
    _poison_free_memory(x, x)
    y, new_residual = ops.fused_add_rmsnorm(x, residual, weight, 1e-5)
    torch.cuda.synchronize()
    assert torch.equal(_bits(new_residual), _bits(want_residual)), "x + residual is one rounding: exact"
    torch.testing.assert_close(y, want_y, **NORM_TOL[dtype])
    _poison_free_memory(x)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                               **NORM_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_kernels_read_strided_rows_and_leading_dims(cuda_extension, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(2, 9, 640, generator=gen).to("cuda", dtype)
    x, residual = wide[..., :512], wide[..., 128:]          # rows with stride 640, not contiguous
    weight = torch.randn(512, generator=gen).to("cuda", dtype)
    want_y, want_residual = reference.fused_add_rmsnorm(x, residual, weight, 1e-6)
    y, new_residual = ops.fused_add_rmsnorm(x, residual, weight, 1e-6)
    assert y.shape == x.shape and torch.equal(_bits(new_residual), _bits(want_residual))
    torch.testing.assert_close(y, want_y, **NORM_TOL[dtype])
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6),
                               **NORM_TOL[dtype])


ROPE_SHAPES = [  # (T, Hq, Hkv, D, block_size)
    (1, 4, 2, 64, 16),        # demo GQA decode
    (37, 32, 8, 128, 16),     # Llama-style GQA 4:1, prefill-sized T
    (5, 8, 8, 64, 8),         # MHA
    (9, 16, 1, 128, 32),      # MQA
    (7, 4, 2, 48, 16),        # head_dim 48
    (6, 3, 1, 10, 4),         # D/2 = 5: the unvectorised path
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "T{}-Hq{}-Hkv{}-D{}-BS{}".format(*s))
def test_rope_store_kv_kernel_equals_reference(cuda_extension, shape, dtype, seed):
    T, Hq, Hkv, D, BS = shape
    q, k, v, table, pos, k_cache, v_cache, slots = _rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.rope_store_kv(q, k, v, table, pos, want_k_cache, want_v_cache, slots)
    _poison_free_memory(want_q, want_k)
    got_q, got_k = ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])
    # equal_nan: the NaN-poisoned slots the reference leaves alone must still be NaN, and only they.
    torch.testing.assert_close(k_cache, want_k_cache, equal_nan=True, **TOL[dtype])
    assert torch.equal(_bits(v_cache), _bits(want_v_cache)), "V is copied: exact, padding untouched"


@pytest.mark.cuda
@pytest.mark.sanitizer
def test_fused_kernels_small_case(cuda_extension):
    # The case compute-sanitizer replays in make gpu-check: both kernels, vector and scalar paths.
    for T, Hq, Hkv, D, BS in [(5, 4, 2, 64, 16), (3, 3, 1, 10, 4)]:
        q, k, v, table, pos, k_cache, v_cache, slots = _rope_inputs(T, Hq, Hkv, D, BS, torch.bfloat16,
                                                                    "cuda", 1)
        want_k_cache = k_cache.clone()
        want_q, _ = reference.rope_store_kv(q, k, v, table, pos, want_k_cache, v_cache.clone(), slots)
        got_q, _ = ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots)
        torch.testing.assert_close(got_q, want_q, **TOL[torch.bfloat16])
        torch.testing.assert_close(k_cache, want_k_cache, equal_nan=True, **TOL[torch.bfloat16])
    for hidden in (256, 1001):
        x, residual = (torch.randn(3, hidden, device="cuda", dtype=torch.float16) for _ in range(2))
        weight = torch.randn(hidden, device="cuda", dtype=torch.float16)
        y, _ = ops.fused_add_rmsnorm(x, residual, weight, 1e-5)
        torch.testing.assert_close(y, reference.fused_add_rmsnorm(x, residual, weight, 1e-5)[0],
                                   **NORM_TOL[torch.float16])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width,pad", [(1, 768, 0), (64, 11008, 0), (5, 37, 3), (3, 1408, 8)])
def test_silu_and_mul_kernel_equals_reference(cuda_extension, dtype, rows, width, pad, seed):
    # x as a view into a wider buffer (pad columns per row), the output NaN-poisoned in free memory.
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * width + pad, generator=gen)).to("cuda", dtype)[:, :2 * width]
    want = reference.silu_and_mul(x)
    _poison_free_memory(want)
    got = ops.silu_and_mul(x)
    torch.testing.assert_close(got, want, msg=f"seed {seed}", **TOL[dtype])


@pytest.mark.cuda
def test_fused_ops_replay_in_a_cuda_graph_with_new_positions_and_slots(cuda_extension):
    # Launch shapes depend only on tensor shapes: a captured step must follow new values on replay.
    dtype, (T, Hq, Hkv, D, BS) = torch.bfloat16, (4, 8, 2, 64, 16)
    q, k, v, table, pos, k_cache, v_cache, slots = _rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed=2)
    x, residual = (torch.randn(T, 256, device="cuda", dtype=dtype) for _ in range(2))
    weight = torch.randn(256, device="cuda", dtype=dtype)
    def step():
        return ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots), \
            ops.fused_add_rmsnorm(x, residual, weight, 1e-5)
    step()                                  # warm up outside the capture (loads the extension)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (got_q, _), (got_y, _) = step()
    new = _rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed=3)
    for dst, src in zip((q, k, v, table, pos), new[:5]):
        dst.copy_(src)
    slots.copy_(new[7])
    x.copy_(torch.randn_like(x))
    want_k_cache = k_cache.clone()
    want_q, _ = reference.rope_store_kv(q, k, v, table, pos, want_k_cache, v_cache.clone(), slots)
    want_y, _ = reference.fused_add_rmsnorm(x, residual, weight, 1e-5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(k_cache, want_k_cache, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(got_y, want_y, **NORM_TOL[dtype])


@pytest.mark.cuda
def test_fused_ops_bad_arguments_get_clear_errors(cuda_extension):
    q, k, v, table, pos, k_cache, v_cache, slots = _rope_inputs(4, 4, 2, 64, 16, torch.float16, "cuda", seed=4)
    with pytest.raises(RuntimeError, match="int64"):
        cuda_extension.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots.int())
    with pytest.raises(RuntimeError, match="convert cos_sin_cache"):
        cuda_extension.rope_store_kv(q, k, v, table.float(), pos, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="even"):
        cuda_extension.rope_store_kv(q[..., :63], k[..., :63], v, table[:, :63], pos, k_cache, v_cache,
                                     slots)
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="weight must be"):
        cuda_extension.fused_add_rmsnorm(x, x, x[0, :32], 1e-5)
    with pytest.raises(RuntimeError, match="convert weight"):
        cuda_extension.rms_norm(x, x[0].float(), 1e-5)


@pytest.mark.cuda
def test_demo_model_on_the_gpu_matches_the_cpu_reference_logits(cuda_extension, seed):
    # The fused ops inside the real model: every norm and every RoPE + cache write runs as a kernel
    # on the GPU (float32, so the comparison is tight); the CPU model runs the references.
    from hf_util import assert_logits_close
    ids = torch.randint(3, 1000, (48,), generator=torch.Generator().manual_seed(seed)).tolist()
    gpu = LLM(LLAMA, device="cuda", dtype="float32").logits(ids).cpu()
    cpu = LLM(LLAMA, device="cpu", dtype="float32").logits(ids)
    assert_logits_close(gpu, cpu)
