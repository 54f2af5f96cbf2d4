"""The fused decode-path kernels on a GPU (cuda/fused_norm.cu, cuda/rope_store_kv.cu, cuda/silu_mul.cu)
against their references (tinyinfer/ops/reference.py) on fresh random inputs: per-dtype tolerances,
NaN-poisoned caches and outputs, strided rows, graph replay with new values, argument errors."""
from __future__ import annotations

import pytest
import torch

from fused_util import DTYPES, NORM_TOL, TOL, bits, poison_free_memory, rope_inputs
from hf_util import LLAMA
from tinyinfer import LLM, ops
from tinyinfer.ops import reference

# ----------------------------------------------------------------------------------------------
# CUDA: kernels vs references
# ----------------------------------------------------------------------------------------------

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
    poison_free_memory(x, x)
    y, new_residual = ops.fused_add_rmsnorm(x, residual, weight, 1e-5)
    torch.cuda.synchronize()
    assert torch.equal(bits(new_residual), bits(want_residual)), "x + residual is one rounding: exact"
    torch.testing.assert_close(y, want_y, **NORM_TOL[dtype])
    poison_free_memory(x)
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
    assert y.shape == x.shape and torch.equal(bits(new_residual), bits(want_residual))
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
    q, k, v, table, pos, k_cache, v_cache, slots = rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.rope_store_kv(q, k, v, table, pos, want_k_cache, want_v_cache, slots)
    poison_free_memory(want_q, want_k)
    got_q, got_k = ops.rope_store_kv(q, k, v, table, pos, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])
    # equal_nan: the NaN-poisoned slots the reference leaves alone must still be NaN, and only they.
    torch.testing.assert_close(k_cache, want_k_cache, equal_nan=True, **TOL[dtype])
    assert torch.equal(bits(v_cache), bits(want_v_cache)), "V is copied: exact, padding untouched"


@pytest.mark.cuda
@pytest.mark.sanitizer
def test_fused_kernels_small_case(cuda_extension):
    # The case compute-sanitizer replays in make gpu-check: both kernels, vector and scalar paths.
    for T, Hq, Hkv, D, BS in [(5, 4, 2, 64, 16), (3, 3, 1, 10, 4)]:
        q, k, v, table, pos, k_cache, v_cache, slots = rope_inputs(T, Hq, Hkv, D, BS, torch.bfloat16,
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
    poison_free_memory(want)
    got = ops.silu_and_mul(x)
    torch.testing.assert_close(got, want, msg=f"seed {seed}", **TOL[dtype])


@pytest.mark.cuda
def test_fused_ops_replay_in_a_cuda_graph_with_new_positions_and_slots(cuda_extension):
    # Launch shapes depend only on tensor shapes: a captured step must follow new values on replay.
    dtype, (T, Hq, Hkv, D, BS) = torch.bfloat16, (4, 8, 2, 64, 16)
    q, k, v, table, pos, k_cache, v_cache, slots = rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed=2)
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
    new = rope_inputs(T, Hq, Hkv, D, BS, dtype, "cuda", seed=3)
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
    q, k, v, table, pos, k_cache, v_cache, slots = rope_inputs(4, 4, 2, 64, 16, torch.float16, "cuda", seed=4)
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
