"""CUDA-graph decode: the padded, bucketed static batch computes exactly what the eager batch does.

On the CPU the runner takes the same padded path without capturing (capture=False): same static
buffers, same padding, same bucket and table-width choice; only the replay is missing. Those tests
compare it against the engine's eager (unpadded) step through the reference ops, in float32. The
CUDA tests compare real graph replay against eager decode on the demo models.
"""
import pytest
import torch

from hf_util import DRAFT, LLAMA, MLA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.cuda_graphs import GraphRunner, StaticBatch
from tinyinfer.engine.sequence import Sequence
from tinyinfer.ops import reference
from tools.bench.prefix import paged_attention_batched

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo", "To be", "KING RICHARD III:\nNow is the winter",
           "First Citizen:\nBefore we proceed any further, hear me speak.", "A", "MENENIUS:\nWhy"]


@pytest.fixture(scope="module")
def llm():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


def _prefilled(llm, lengths, extra):
    """Sequences of random tokens: `lengths[i]` already cached, `extra[i]` more waiting to be fed."""
    gen = torch.Generator().manual_seed(sum(lengths))
    engine, seqs = llm.engine, []
    for i, (n, e) in enumerate(zip(lengths, extra)):
        ids = torch.randint(3, llm.config.vocab_size, (n + e,), generator=gen).tolist()
        seq = Sequence(f"t{i}", ids, SamplingParams(max_tokens=1), 0)
        engine.blocks.grow(seq, n + e)
        engine.runner.execute(build_batch([seq], [n], engine.block_size))
        seq.num_cached = n
        seqs.append(seq)
    return seqs


def _release(llm, seqs):
    for s in seqs:
        llm.engine.blocks.free(s)


def _batch(llm, seqs, num_new):
    return build_batch(seqs, num_new, llm.engine.block_size)


def _eager(llm, seqs, num_new):
    """Logits of every new row, launched eagerly (the runner does not advance the sequences)."""
    return llm.engine.runner.execute(_batch(llm, seqs, num_new), all_logits=True)


def test_static_metadata_is_the_eager_metadata_plus_contract_padding(llm):
    seqs = _prefilled(llm, [5, 40, 17], [1, 3, 2])
    num_new = [1, 3, 2]
    _, positions, meta = _batch(llm, seqs, num_new).to_device(torch.device("cpu"))
    batch = StaticBatch(max_seqs=8, q_len=4, max_blocks=16, device=torch.device("cpu"))
    T = batch.fill(_batch(llm, seqs, num_new), bucket=4, width=8)
    ids_s, pos_s, meta_s = batch.meta(bucket=4, width=8)
    assert T == 6 and ids_s.shape == (16,) and meta_s.block_tables.shape == (4, 8)
    assert torch.equal(pos_s[:T], positions) and torch.equal(meta_s.slot_mapping[:T], meta.slot_mapping)
    assert torch.equal(meta_s.slot_mapping[T:], torch.full((10,), -1))         # padding rows: skip
    assert meta_s.seq_lens.tolist() == meta.seq_lens.tolist() + [0]           # padding seq: empty
    assert meta_s.query_start_loc.tolist() == meta.query_start_loc.tolist() + [T]
    for b, s in enumerate(seqs):                                               # blocks in use agree
        assert meta_s.block_tables[b, :len(s.block_table)].tolist() == s.block_table
    assert meta_s.max_q_len == 4 and not meta_s.prefill
    _release(llm, seqs)


def test_block_table_rows_follow_changed_tables(llm):
    # Host rows are rewritten only when a table differs: a rolled-back and regrown table (same length,
    # different last block) and a width change must both show up.
    seqs = _prefilled(llm, [20, 33], [1, 1])
    batch = StaticBatch(max_seqs=4, q_len=1, max_blocks=8, device=torch.device("cpu"))
    batch.fill(_batch(llm, seqs, [1, 1]), bucket=2, width=4)
    spare = llm.engine.blocks.allocator.allocate(1)
    old = seqs[1].block_table[-1]
    seqs[1].block_table[-1] = spare[0]
    batch.fill(_batch(llm, seqs, [1, 1]), bucket=2, width=4)
    assert batch.meta(2, 4)[2].block_tables[1, :3].tolist() == seqs[1].block_table
    batch.fill(_batch(llm, seqs, [1, 1]), bucket=2, width=8)
    assert batch.meta(2, 8)[2].block_tables[1, :3].tolist() == seqs[1].block_table
    seqs[1].block_table[-1] = old
    llm.engine.blocks.allocator.release(spare)
    _release(llm, seqs)


@pytest.mark.parametrize("q_len,num_new", [(1, [1, 1, 1]), (4, [4, 1, 3]), (4, [4, 4, 4])])
def test_padded_step_logits_equal_eager_step(llm, q_len, num_new):
    # 3 sequences -> bucket 4: one padding sequence, padding rows; logits of every real row match.
    seqs = _prefilled(llm, [9, 31, 70], num_new)
    eager = _eager(llm, seqs, num_new)                                          # (T, vocab)
    runner = GraphRunner(llm.model, llm.engine.runner.kv, q_len=q_len, capture=False)
    assert runner.can_run(_batch(llm, seqs, num_new)) and runner.bucket(len(seqs)) == 4
    padded = runner.run(_batch(llm, seqs, num_new))
    assert padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    _release(llm, seqs)


def test_runner_declines_steps_outside_its_shapes(llm):
    kv = llm.engine.runner.kv
    runner = GraphRunner(llm.model, kv, q_len=2, buckets=(1, 2), capture=False)
    seqs = _prefilled(llm, [4, 4, 4], [3, 3, 3])
    assert not runner.can_run(_batch(llm, seqs, [1, 1, 1]))                    # 3 > biggest bucket
    assert not runner.can_run(_batch(llm, seqs[:2], [3, 1]))                   # longer than q_len
    assert runner.can_run(_batch(llm, seqs[:2], [2, 1]))
    _release(llm, seqs)
    with pytest.raises(ValueError, match="q_len=17"):
        GraphRunner(llm.model, kv, q_len=17, capture=False)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphRunner(llm.model, kv, capture=True)


def test_padded_decode_generates_what_eager_decode_does(llm):
    # Sequences finish at different times, so the batch crosses buckets (7 -> 8, 5 -> 8, 3 -> 4, ...);
    # with buckets (1, 2, 4) the first steps (7 > 4) run eagerly, the later ones padded.
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    runner = llm.engine.runner
    eager = [o.token_ids for o in llm.generate(PROMPTS, params)]
    try:
        for buckets in ((1, 2, 4, 8), (1, 2, 4)):
            runner.graphs[1] = GraphRunner(llm.model, runner.kv, buckets=buckets, capture=False)
            assert [o.token_ids for o in llm.generate(PROMPTS, params)] == eager
    finally:
        runner.graphs.clear()
    assert llm.stats["free_blocks"] == llm.stats["num_blocks"]


def test_cuda_graphs_flag_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        LLM(LLAMA, device="cpu", cuda_graphs=True)


# ------------------------------------------------------------------------------------------------
# On a GPU: real capture and replay (the cuda_extension fixture fails, never skips, without kernels)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[LLAMA, DRAFT, MLA], ids=["llama", "draft", "mla"])
def gpu_pair(request, cuda_extension):
    """The same demo model twice on the GPU: graphs off and on (same dtype, same kernels)."""
    kw = dict(device="cuda", max_kv_tokens=16384)
    eager, graphs = LLM(request.param, cuda_graphs=False, **kw), LLM(request.param, cuda_graphs=True, **kw)
    assert graphs.engine.runner.graphs[1].disabled is None, graphs.engine.runner.graphs[1].disabled
    yield eager, graphs
    del eager, graphs
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_decode_equals_eager_decode(gpu_pair, batch):
    # Bucket-sized batches that stay whole (same max_tokens): both paths run the same kernels on the
    # same row counts, so the greedy tokens must be identical.
    eager, graphs = gpu_pair
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    want = [o.token_ids for o in eager.generate(PROMPTS[:batch], params)]
    got = [o.token_ids for o in graphs.generate(PROMPTS[:batch], params)]
    assert got == want
    runner = graphs.engine.runner.graphs[1]
    assert runner.num_graphs() >= 1 and runner.disabled is None


@pytest.mark.cuda
def test_graph_step_logits_match_eager_at_odd_batch_and_across_replays(gpu_pair):
    # 3 sequences run in the bucket of 4; replaying the same graph for three steps in a row must track
    # the new metadata each time (a stale buffer would repeat the first step's logits).
    _, llm = gpu_pair
    runner = llm.engine.runner.graphs[1]
    seqs = _prefilled(llm, [7, 100, 33], [3, 3, 3])
    before = runner.num_graphs()
    for _ in range(3):
        eager = _eager(llm, seqs, [1, 1, 1]).clone()
        got = runner.run(_batch(llm, seqs, [1, 1, 1]))
        for s in seqs:
            s.num_cached += 1
        torch.testing.assert_close(got, eager, rtol=0, atol=2e-2 * eager.abs().max().item())
    assert runner.num_graphs() <= before + 1 and runner.disabled is None
    _release(llm, seqs)


@pytest.mark.cuda
def test_verify_shape_graph_matches_eager(gpu_pair):
    # q_len k+1 = 5 (speculative verification), mixed query lengths in one padded bucket.
    _, llm = gpu_pair
    runner = GraphRunner(llm.model, llm.engine.runner.kv, q_len=5)
    assert runner.disabled is None, runner.disabled
    seqs = _prefilled(llm, [12, 64, 200], [5, 2, 5])
    eager = _eager(llm, seqs, [5, 2, 5]).clone()
    got = runner.run(_batch(llm, seqs, [5, 2, 5]))
    torch.testing.assert_close(got, eager, rtol=0, atol=2e-2 * eager.abs().max().item())
    assert runner.num_graphs() == 1
    _release(llm, seqs)


# ------------------------------------------------------------------------------------------------
# The CPU attention as one padded group (ops/cpu_attention.py pad_group + attend_group; the bench's
# baseline, tools/bench/prefix.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_lens,q_lens,pad", [
    ([37, 1, 0, 12, 20], [4, 1, 0, 0, 16], 3),     # verify-like runs, a padding sequence, q_len 0
    ([37, 1, 3, 12, 20], [1, 1, 1, 1, 1], 3),      # decode, padded to a bucket
    ([20, 20, 20, 20, 20], [1, 1, 1, 1, 1], 0),    # decode, equal lengths: the unmasked path
    ([20, 20, 20, 20, 20], [2, 2, 1, 3, 2], 1)])
@pytest.mark.parametrize("hq,hkv,d,dv", [(4, 2, 64, 64), (8, 8, 32, 32), (6, 1, 16, 16), (4, 1, 40, 32)])
def test_batched_paged_attention_equals_reference(hq, hkv, d, dv, seq_lens, q_lens, pad):
    gen = torch.Generator().manual_seed(hq * 100 + d)
    bs, nb = 8, 64
    k_cache = torch.full((nb, bs, hkv, d), float("nan"))
    v_cache = torch.full((nb, bs, hkv, dv), float("nan")) if dv != 32 or d == dv else None
    if v_cache is None:                                   # MLA-style: V is a strided view of K
        v_cache = k_cache[..., :dv]
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = torch.full((5, 6), 10**6, dtype=torch.int32)       # garbage past the last block
    for b, n in enumerate(seq_lens):
        blocks = [perm.pop() for _ in range(-(-n // bs))]
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(n):
            k_cache[blocks[p // bs], p % bs] = torch.randn(hkv, d, generator=gen)
            if v_cache.data_ptr() != k_cache.data_ptr():
                v_cache[blocks[p // bs], p % bs] = torch.randn(hkv, dv, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]) + pad, hq, d, generator=gen)
    args = (k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl, 0.3)
    want = reference.paged_attention(q, *args)
    got = paged_attention_batched(q, *args)
    assert torch.isfinite(got).all() and torch.equal(got[len(q) - pad:], torch.zeros(pad, hq, dv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
