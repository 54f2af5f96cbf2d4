"""rope_store_kv v2 on a GPU (cuda/rope_store_kv.cu, binding cuda/bind_fused.h): RoPE from the model's
precomputed cos/sin table, gathered at each token's position inside the kernel, + the K/V cache write.
Called through the extension directly; the reference is the rotate_half formula in torch ops written
here, out = x * cat(c, c) + rotate_half(x) * cat(s, s) with (c, s) = cos_sin_cache[positions] -- the same
ops, in the same dtype, as the former per-token cos/sin path -- so the comparison is bit for bit.

Inputs: q, k, v as views into one fused QKV buffer, shuffled positions, padding slots (-1), NaN-poisoned
caches (entries without a slot must keep their bits), fp32 / fp16 / bf16, vector and scalar paths.
"""
import pytest
import torch

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def table(max_pos: int, d: int, dtype, scaling: float = 1.0) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    freqs = torch.arange(max_pos, dtype=torch.float32, device="cuda")[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1).to(dtype)   # (P, D)


def inputs(T, Hq, Hkv, D, BS, dtype, seed, max_pos=4096):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen, device="cuda").to(dtype)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    nb = 2 * T // BS + 3
    k_cache = torch.full((nb, BS, Hkv, D), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(nb * BS, generator=gen, device="cuda")[:T]
    slots[::3] = -1                                                       # padding tokens
    positions = torch.randint(0, max_pos, (T,), generator=gen, device="cuda")
    return q, k, v, table(max_pos, D, dtype, 1.25), positions, k_cache, v_cache, slots


def reference(q, k, v, cos_sin, positions, k_cache, v_cache, slots):
    c, s = cos_sin[positions].chunk(2, dim=-1)                             # (T, D/2) each
    cos, sin = torch.cat((c, c), -1)[:, None], torch.cat((s, s), -1)[:, None]

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    q_rot, k_rot = rope(q), rope(k)
    keep = slots >= 0
    bs = k_cache.shape[1]
    k_cache[slots[keep] // bs, slots[keep] % bs] = k_rot[keep]
    v_cache[slots[keep] // bs, slots[keep] % bs] = v[keep]
    return q_rot, k_rot


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 32, 128, 16), (37, 32, 8, 128, 16), (9, 4, 2, 64, 8),
                                   (6, 3, 1, 10, 4)], ids=lambda s: "T{}-Hq{}-Hkv{}-D{}-BS{}".format(*s))
def test_table_rope_is_bit_identical_to_the_formula(cuda_extension, shape, dtype):
    args = inputs(*shape, dtype, seed=sum(shape))
    want_k_cache, want_v_cache = args[5].clone(), args[6].clone()
    want_q, want_k = reference(*args[:5], want_k_cache, want_v_cache, args[7])
    got_q, got_k = cuda_extension.rope_store_kv(*args)
    torch.cuda.synchronize()
    assert torch.equal(bits(got_q), bits(want_q)) and torch.equal(bits(got_k), bits(want_k))
    assert torch.equal(bits(args[5]), bits(want_k_cache)), "K cache: rotated rows in their slots, rest untouched"
    assert torch.equal(bits(args[6]), bits(want_v_cache)), "V cache: copied rows in their slots, rest untouched"


@pytest.mark.sanitizer
def test_table_rope_small_and_out_of_range_position(cuda_extension):
    q, k, v, cos_sin, positions, k_cache, v_cache, slots = inputs(5, 4, 2, 64, 16, torch.bfloat16, seed=1,
                                                                  max_pos=64)
    positions[2] = 64                                                     # past the table: NaN, never garbage
    got_q, got_k = cuda_extension.rope_store_kv(q, k, v, cos_sin, positions, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert got_q[2].isnan().all() and got_k[2].isnan().all()
    ok = torch.arange(5, device="cuda") != 2
    want_q, _ = reference(q, k, v, cos_sin, positions.clamp(max=63), k_cache.clone(), v_cache.clone(), slots)
    assert torch.equal(bits(got_q[ok]), bits(want_q[ok]))


def test_table_rope_replays_in_a_cuda_graph_with_new_positions(cuda_extension):
    args = inputs(4, 8, 2, 64, 16, torch.bfloat16, seed=2)
    cuda_extension.rope_store_kv(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_q, _ = cuda_extension.rope_store_kv(*args)
    args[4].copy_(torch.tensor([7, 4095, 0, 1000], device="cuda"))
    want_q, _ = reference(*args[:5], args[5].clone(), args[6].clone(), args[7])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(got_q), bits(want_q))


def test_table_rope_bad_arguments_get_clear_errors(cuda_extension):
    q, k, v, cos_sin, positions, k_cache, v_cache, slots = inputs(4, 4, 2, 64, 16, torch.float16, seed=4)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        cuda_extension.rope_store_kv(q, k, v, cos_sin, positions.int(), k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="convert cos_sin_cache"):
        cuda_extension.rope_store_kv(q, k, v, cos_sin.float(), positions, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match=r"cos_sin_cache must be \(max_positions, head_dim=64\)"):
        cuda_extension.rope_store_kv(q, k, v, cos_sin[:, :32], positions, k_cache, v_cache, slots)
