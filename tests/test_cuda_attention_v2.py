"""Paged attention v2 on a GPU (cuda/paged_attention.cuh: tensor-core QK^T and PV, split-KV from the actual
sequence lengths), called through the extension directly and compared with float64 written here.

What is new against tests/test_paged_attention.py: q_len up to 16 x GQA groups (m-tiles 1, 2, 4), one
partition per sequence (the kernel normalises and zeroes padding rows itself) and many (merge kernel),
short contexts behind wide block tables, MLA 576/512 with 128 heads (chunks of 32), and a CUDA graph
replayed with lengths that change how many partitions hold keys.

Batches are built as dense per-sequence K/V scattered into shuffled blocks of a NaN-filled pool; block-table
entries past a sequence's blocks are -1; the output is poisoned (caching allocator primed with NaN).
"""
import math

import pytest
import torch

pytestmark = pytest.mark.cuda

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def build(lens, q_lens, hq, hkv, d, dv, bs, dtype, extra_blocks=2, pad_rows=3, mla=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil(n / bs) for n in lens]
    pool = torch.randperm(2 * sum(need) + 7, generator=gen, device="cuda").tolist()
    nb, mb = len(pool), max(need + [1]) + extra_blocks
    k_cache = torch.full((nb, bs, hkv, d), float("nan"), dtype=dtype, device="cuda")
    v_cache = k_cache[..., :dv] if mla else torch.full((nb, bs, hkv, dv), float("nan"), dtype=dtype, device="cuda")
    tables = torch.full((len(lens), mb), -1, dtype=torch.int32, device="cuda")
    dense = []
    for b, n in enumerate(lens):
        blocks = torch.tensor([pool.pop() for _ in range(need[b])], dtype=torch.long, device="cuda")
        tables[b, :need[b]] = blocks.int()
        k = torch.randn(n, hkv, d, generator=gen, device="cuda").to(dtype)
        v = k[..., :dv] if mla else torch.randn(n, hkv, dv, generator=gen, device="cuda").to(dtype)
        pos = torch.arange(n, device="cuda")
        k_cache[blocks[pos // bs], pos % bs] = k
        if not mla:
            v_cache[blocks[pos // bs], pos % bs] = v
        dense.append((k, v))
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    q = torch.randn(starts[-1] + pad_rows, hq, d, generator=gen, device="cuda").to(dtype)
    args = (q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32, device="cuda"),
            torch.tensor(starts, dtype=torch.int32, device="cuda"), 0.6 / math.sqrt(d))
    return args, dense


def reference(args, dense):
    q, _, v_cache, _, _, qsl, scale = args
    T, hq, _ = q.shape
    hkv = dense[0][0].shape[1] if dense else 1
    out = torch.zeros(T, hq, v_cache.shape[-1], dtype=torch.float64, device="cuda")
    starts = qsl.tolist()
    for b, (k, v) in enumerate(dense):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        n = k.shape[0]
        qb = q[q0:q1].double().view(q1 - q0, hkv, hq // hkv, -1)               # (Q, Hkv, G, D)
        s = torch.einsum("qhgd,nhd->hgqn", qb, k.double()) * scale              # (Hkv, G, Q, N)
        qpos = n - (q1 - q0) + torch.arange(q1 - q0, device="cuda")
        s = s.masked_fill(torch.arange(n, device="cuda")[None, :] > qpos[:, None], float("-inf"))
        o = torch.einsum("hgqn,nhd->qhgd", s.softmax(-1), v.double())
        out[q0:q1] = o.reshape(q1 - q0, hq, -1)
    return out


def check(ext, args, dense, dtype):
    q, v_cache = args[0], args[2]
    bait = torch.full((q.shape[0], q.shape[1], v_cache.shape[-1]), float("nan"), dtype=dtype, device="cuda")
    del bait                                    # the output reuses this NaN-filled block
    got = ext.paged_attention(*args)
    want = reference(args, dense)
    torch.cuda.synchronize()
    assert not got.isnan().any(), "NaN in the output: an unwritten row or an unused cache slot was read"
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=1e-2)
    pad0 = args[5][-1].item()
    assert torch.equal(got[pad0:], torch.zeros_like(got[pad0:])), "padding rows must be zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("q_len", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("heads", [(32, 8), (8, 8), (16, 1)], ids=["gqa4", "mha", "mqa16"])
@pytest.mark.parametrize("d", [64, 128])
def test_q_len_up_to_16_every_group(cuda_extension, d, heads, q_len, dtype):
    lens = [q_len + 3, 700, 2049, q_len]          # includes a sequence of exactly q_len keys
    args, dense = build(lens, [q_len] * 4, *heads, d, d, 16, dtype, seed=q_len + d)
    check(cuda_extension, args, dense, dtype)


@pytest.mark.parametrize("batch", [1, 2, 64])
def test_one_and_many_partitions(cuda_extension, batch):
    # batch 1: many partitions + merge; batch 64 x 8 KV heads fills an H100/H200 alone: one partition.
    lens = [(4000 * (b + 1)) // batch + 1 for b in range(batch)]
    args, dense = build(lens, [1] * batch, 32, 8, 128, 128, 16, torch.bfloat16, seed=batch)
    check(cuda_extension, args, dense, torch.bfloat16)


def test_short_contexts_behind_a_wide_block_table(cuda_extension):
    # A table sized for 32k tokens while the sequences hold 5..300: partitions follow the real lengths.
    args, dense = build([5, 300, 129], [1, 4, 2], 32, 8, 128, 128, 16, torch.float16, extra_blocks=2000)
    check(cuda_extension, args, dense, torch.float16)


@pytest.mark.parametrize("q_len", [1, 4, 16])
@pytest.mark.parametrize("alias", [True, False], ids=["v_view_of_k", "separate_v"])
def test_mla_128_heads(cuda_extension, q_len, alias):
    args, dense = build([900, 33, q_len], [q_len] * 3, 128, 1, 576, 512, 16, torch.bfloat16, mla=alias)
    check(cuda_extension, args, dense, torch.bfloat16)


@pytest.mark.sanitizer
def test_small_batch_every_path(cuda_extension):
    for d, heads, q_len in [(64, (8, 2), 3), (128, (32, 8), 16), (576, (16, 1), 2)]:
        args, dense = build([70, 3, 260], [q_len, 1, q_len], *heads, d, 512 if d == 576 else d, 16,
                            torch.float16, mla=d == 576)
        check(cuda_extension, args, dense, torch.float16)


def test_graph_replay_follows_new_lengths(cuda_extension):
    # Captured with a 3000-token sequence (many partitions hold keys); replayed after shortening the
    # sequences in place (fewer live partitions, other q_lens) and again at the captured lengths.
    args, dense = build([3000, 64, 9], [1, 4, 1], 32, 8, 128, 128, 16, torch.bfloat16, seed=1)
    cuda_extension.paged_attention(*args)       # load and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_extension.paged_attention(*args)
    seq_lens, qsl = args[4], args[5]
    for lens, q_lens in [([7, 60, 1], [1, 2, 1]), ([3000, 64, 9], [1, 4, 1]), ([2999, 5, 9], [3, 5, 0])]:
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        qsl.copy_(torch.tensor([0, q_lens[0], q_lens[0] + q_lens[1], sum(q_lens)], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        # The first n rows of each sequence are unchanged in the cache: the reference truncates.
        want = reference(args, [(k[:n], v[:n]) for (k, v), n in zip(dense, lens)])
        torch.testing.assert_close(out.double(), want, atol=TOL[torch.bfloat16], rtol=1e-2)
        assert torch.equal(out[sum(q_lens):], torch.zeros_like(out[sum(q_lens):]))
