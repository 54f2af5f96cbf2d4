"""paged_attention: the reference against a float64 dense computation (CPU), and the CUDA kernel
(cuda/paged_attention.cu) against the reference (GPU).

Every batch is built the hard way: shuffled block tables over a pool much larger than needed, NaN in
every cache slot no sequence owns (so reading past seq_len shows up as NaN), -1 in block-table entries
past each sequence's last block, varlen queries (q_len 0 included) and padding rows after the last
sequence. The dense check gathers each sequence's K/V from the rows it wrote, not through the table.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from paged_util import CPU_CASES, Batch, dense_float64, make_batch
from tinyinfer import ops
from tinyinfer.ops import reference
from tinyinfer.ops.cuda import CUDA_IMPLS


# ------------------------------------------------------------------------------------------------
# CPU: the reference is the contract
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CPU_CASES))
def test_reference_matches_float64_attention(name):
    seq_lens, q_lens, hq, hkv, d, dv, bs, mla = CPU_CASES[name]
    batch = make_batch(seq_lens, q_lens, hq, hkv, d, dv, bs, torch.float32, mla=mla, seed=len(name))
    got = reference.paged_attention(*batch.args())
    want = dense_float64(batch)
    assert not got.isnan().any(), "NaN in the output: an unused (NaN) cache slot was read"
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_reference_writes_zeros_in_padding_rows():
    batch = make_batch([12, 7], [3, 2], 4, 2, 8, 8, 4, torch.float32, pad_rows=5)
    out = reference.paged_attention(*batch.args())
    assert torch.equal(out[5:], torch.zeros_like(out[5:]))


def test_reference_honours_strided_caches():
    batch = make_batch([25, 40], [3, 1], 4, 2, 16, 8, 8, torch.float32, strided=True)
    assert not batch.k_cache.is_contiguous() and not batch.v_cache.is_contiguous()
    torch.testing.assert_close(reference.paged_attention(*batch.args()).double(), dense_float64(batch),
                               atol=2e-5, rtol=1e-5)


def test_op_on_cpu_agrees_with_the_reference():
    # Off a GPU the op runs a PyTorch body (the reference, or a batched equivalent of it).
    batch = make_batch([9, 17, 0], [2, 1, 0], 4, 2, 8, 8, 4, torch.float32)
    torch.testing.assert_close(ops.paged_attention(*batch.args()), reference.paged_attention(*batch.args()),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_lens, pad_rows", [([37, 5, 64, 1, 20], 0), ([37, 5, 64, 1, 20], 3),
                                              ([24, 24, 24], 0)], ids=["masked", "padded", "equal_lengths"])
@pytest.mark.parametrize("hq, hkv", [(8, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_op_on_cpu_pure_decode_matches_float64(seq_lens, pad_rows, hq, hkv):
    # One query per sequence: the batched CPU op's decode path, which folds the query heads of each KV
    # head into one axis (the GQA fold), with and without masking and padding rows.
    batch = make_batch(seq_lens, [1] * len(seq_lens), hq, hkv, 16, 16, 8, torch.float32,
                       pad_rows=pad_rows, seed=hq + hkv)
    got = ops.paged_attention(*batch.args())
    assert not got.isnan().any(), "NaN in the output: an unused (NaN) cache slot was read"
    torch.testing.assert_close(got.double(), dense_float64(batch), atol=2e-5, rtol=1e-5)


def test_kernel_is_registered_for_cuda():
    assert "paged_attention" in CUDA_IMPLS


REPO = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no g++ on PATH: the CPU emulation of the kernel is not built")
def test_shipped_kernel_source_matches_float64_under_cpu_emulation(tmp_path):
    # cuda/paged_attention.cu itself, compiled by g++ against tests/host/emulate_cuda.h (fibers as
    # threads, deferred cp.async), on decode / verify (multi-pass) / MHA with empty sequences / MLA
    # cases; the program compares with a float64 evaluation of the contract and exits non-zero on a
    # mismatch, an unwritten (NaN-poisoned) output or a copy from outside the inputs.
    binary = tmp_path / "emulate_paged_attention"
    build = subprocess.run([CXX, "-std=c++17", "-O0", "-Wno-unknown-pragmas", "-I", str(REPO / "cuda"),
                            "-I", str(REPO / "tests" / "host"),
                            str(REPO / "tests" / "host" / "emulate_paged_attention.cpp"), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"emulation does not compile:\n{build.stderr[-6000:]}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"emulated kernel disagrees with float64:\n{run.stdout[-6000:]}"


# ------------------------------------------------------------------------------------------------
# CUDA: the kernel against the reference
# ------------------------------------------------------------------------------------------------

TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
HEADS = [(8, 8), (32, 8), (16, 1), (32, 32)]


def random_lengths(num: int, max_len: int, q_len: int, seed: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(q_len, max_len + 1, (num,), generator=gen).tolist()
    lens[seed % num] = max_len  # one sequence at the maximum
    return lens, [q_len] * num


def poisoned_call(fn, batch: Batch) -> torch.Tensor:
    """Run fn with the caching allocator primed so that the output tensor starts as NaN: a block of the
    output's size is filled with NaN and freed just before the call, so rows the kernel forgets show."""
    T, hq = batch.q.shape[:2]
    bait = torch.full((T, hq, batch.v_cache.shape[-1]), float("nan"), dtype=batch.q.dtype, device="cuda")
    del bait
    return fn(*batch.args())


def check_kernel(batch: Batch, dtype: torch.dtype) -> None:
    got = poisoned_call(ops.paged_attention, batch)
    want = reference.paged_attention(*batch.args())
    torch.cuda.synchronize()
    assert not got.isnan().any(), "NaN in the kernel output: unwritten row or an unused slot was read"
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=1e-2)
    pad0 = batch.query_start_loc[-1].item()
    assert torch.equal(got[pad0:], torch.zeros_like(got[pad0:])), "padding rows must be zeros"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("q_len", [1, 4, 16])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=[f"{a}q{b}kv" for a, b in HEADS])
def test_kernel_matches_reference(cuda_extension, heads, d, bs, q_len, dtype):
    hq, hkv = heads
    lens, q_lens = random_lengths(7, 2048, q_len, seed=d + bs + q_len)
    batch = make_batch(lens, q_lens, hq, hkv, d, d, bs, dtype, "cuda", pool_blocks=3000, seed=q_len * bs)
    check_kernel(batch, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_kernel_mla_latent_matches_reference(cuda_extension, q_len, dtype):
    lens, q_lens = random_lengths(7, 1024, q_len, seed=q_len)
    batch = make_batch(lens, q_lens, 16, 1, 576, 512, 16, dtype, "cuda", pool_blocks=1000, mla=True)
    check_kernel(batch, dtype)


@pytest.mark.cuda
def test_kernel_mla_128_heads_and_separate_v(cuda_extension):
    # 128 query heads (8 chunks of 16) and a V that is not a view of K (the kernel loads it separately).
    batch = make_batch([300, 17, 64], [2, 1, 3], 128, 1, 576, 512, 16, torch.bfloat16, "cuda", mla=True)
    check_kernel(batch, torch.bfloat16)
    batch.v_cache = batch.v_cache.clone()
    check_kernel(batch, torch.bfloat16)


@pytest.mark.cuda
def test_kernel_varlen_empty_sequences_and_long_queries(cuda_extension):
    # q_len 0 sequences, q_len > 16 (several passes over a partition), a sequence of exactly q_len keys.
    batch = make_batch([500, 0, 33, 20, 4000, 7], [3, 0, 20, 20, 1, 0], 32, 8, 128, 128, 16, torch.float16,
                       "cuda", pad_rows=9)
    check_kernel(batch, torch.float16)


@pytest.mark.cuda
@pytest.mark.sanitizer
def test_kernel_strided_caches_small(cuda_extension):
    batch = make_batch([90, 13, 1], [4, 1, 1], 8, 2, 64, 64, 8, torch.bfloat16, "cuda", strided=True)
    assert not batch.k_cache.is_contiguous()
    check_kernel(batch, torch.bfloat16)


@pytest.mark.cuda
def test_kernel_all_rows_padding(cuda_extension):
    batch = make_batch([10, 5], [0, 0], 8, 8, 64, 64, 16, torch.float16, "cuda", pad_rows=4)
    out = poisoned_call(ops.paged_attention, batch)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph_with_new_lengths(cuda_extension):
    # The launch shape depends on tensor shapes only: capture once, change seq_lens / query_start_loc
    # and the block tables in place, replay, and the result follows the new values.
    first = make_batch([700, 64, 5], [1, 4, 1], 32, 8, 128, 128, 16, torch.bfloat16, "cuda", pool_blocks=200,
                       seed=1)
    ops.paged_attention(*first.args())  # load the extension outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention(*first.args())
    second = make_batch([70, 640, 3], [2, 1, 3], 32, 8, 128, 128, 16, torch.bfloat16, "cuda", pool_blocks=200,
                        seed=2)
    assert second.block_tables.shape[1] <= first.block_tables.shape[1]
    first.q.copy_(second.q)
    first.k_cache.copy_(second.k_cache)
    first.v_cache.copy_(second.v_cache)
    first.block_tables.fill_(-1)
    first.block_tables[:, :second.block_tables.shape[1]].copy_(second.block_tables)
    first.seq_lens.copy_(second.seq_lens)
    first.query_start_loc.copy_(second.query_start_loc)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), reference.paged_attention(*second.args()).float(), atol=1e-2,
                               rtol=1e-2)


@pytest.mark.cuda
def test_kernel_rejects_unsupported_head_dim(cuda_extension):
    batch = make_batch([10], [1], 4, 2, 96, 96, 16, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head dims"):
        cuda_extension.paged_attention(*batch.args())


@pytest.mark.cuda
def test_kernel_rejects_non_power_of_two_block_size(cuda_extension):
    batch = make_batch([30], [1], 4, 2, 64, 64, 12, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="power-of-two block size"):
        cuda_extension.paged_attention(*batch.args())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,dim,block", [(torch.float32, 64, 16), (torch.float16, 96, 16),
                                             (torch.float16, 64, 12)])
def test_op_takes_the_reference_path_with_a_warning_where_no_kernel_fits(cuda_extension, dtype, dim,
                                                                          block):
    batch = make_batch([30], [1], 4, 2, dim, dim, block, dtype, "cuda")
    with pytest.warns(RuntimeWarning, match="reference path"):
        out = ops.paged_attention(*batch.args())
    torch.testing.assert_close(out, reference.paged_attention(*batch.args()))
