"""Prefix caching: the block manager finds committed blocks by content (the key chains the whole
prefix, so equal blocks at other positions never collide), takes them over with ref count + 1, keeps
freed ones findable until evicted (empty blocks first, then least recently freed) and never takes the
block of a prompt's last token; engines with caching on produce exactly the tokens of engines with it
off (greedy and seeded; Llama, MLA, INT4), hit exactly the blocks a constructed workload shares, lose
nothing under eviction and preemption, never write a shared or committed block, and end with every ref
count at 0."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine_util import WriteGuard, assert_all_free, engine_for, random_ids
from hf_util import LLAMA, MLA
from tinyinfer import LLM, LLMEngine, SamplingParams
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.sequence import Sequence


def seq_of(ids: list[int], rid: str = "s") -> Sequence:
    return Sequence(rid, ids, SamplingParams(max_tokens=1), 0)


def computed(bm: BlockManager, ids: list[int], rid: str = "s") -> Sequence:
    """A sequence admitted with whatever is cached, then fully computed and committed."""
    s = seq_of(ids, rid)
    assert bm.admit(s, bm.cached_prefix(s), len(s))
    s.num_cached = len(s)
    bm.commit(s)
    return s


def test_blocks_are_found_by_their_whole_prefix_and_shared():
    bm = BlockManager(16, 4, enable_caching=True)
    a = computed(bm, list(range(10, 20)))                        # 2 full blocks + 2 tokens
    assert a.num_committed == 2
    b = seq_of(list(range(10, 18)) + [99, 98, 97])
    hit = bm.cached_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.admit(b, hit, len(b)) and b.num_cached == 8 and b.block_table[:2] == hit
    assert [bm.allocator.ref_counts[x] for x in hit] == [2, 2]
    assert bm.cached_prefix(seq_of(list(range(10, 14)) + [5, 6, 7, 8, 9])) == a.block_table[:1]
    # Same tokens in block 1, another block 0: a different prefix, so no hit at all.
    assert bm.cached_prefix(seq_of([1, 2, 3, 4] + list(range(14, 18)) + [0])) == []
    assert (bm.queries, bm.hits) == (10 + 11, 8)


def test_equal_blocks_at_different_positions_never_collide():
    # Block B committed at position 1 (after A): a prompt that starts with B holds the same tokens in
    # block 0, but its prefix differs, so it must miss -- already at its first block.
    bm = BlockManager(16, 4, enable_caching=True)
    A, B = [11, 12, 13, 14], [21, 22, 23, 24]
    computed(bm, A + B + [5])
    assert bm.cached_prefix(seq_of(B + [31, 32, 33, 34, 9])) == []
    assert bm.cached_prefix(seq_of(B + B + [9])) == []
    # B after itself: the repeated block is another prefix than B after A.
    bb = computed(bm, B + B + [5], "bb")
    assert bm.cached_prefix(seq_of(A + B + [7])) != bb.block_table[:2]
    assert len(set(bm.allocator.cached.values())) == len(bm.allocator.cached) == 4


def test_the_block_of_the_last_token_is_never_taken():
    bm = BlockManager(16, 4, enable_caching=True)
    a = computed(bm, list(range(10, 18)))                        # exactly 2 full blocks, committed
    assert a.num_committed == 2
    again = seq_of(list(range(10, 18)))
    assert bm.cached_prefix(again) == a.block_table[:1]          # block 1 holds its last token
    assert bm.admit(again, a.block_table[:1], len(again)) and again.num_cached == 4
    assert again.block_table[1] != a.block_table[1]              # recomputed in a block of its own
    # Committing the recomputed block leaves the prefix in its first block: one block per key.
    again.num_cached = len(again)
    bm.commit(again)
    alloc = bm.allocator
    assert alloc.cached == {alloc.hashes[b]: b for b in a.block_table[:2]}
    assert alloc.hashes[again.block_table[1]] is None
    bm.free(a)
    bm.free(again)
    assert sorted(alloc.allocate(16)) == list(range(16)) and alloc.evictions == 2 and not alloc.cached


def test_freed_blocks_stay_cached_count_as_free_and_are_evicted_last_lru():
    bm = BlockManager(4, 2, enable_caching=True)
    a = computed(bm, [5, 6, 7, 8, 9])                            # blocks: [5 6] [7 8] [9]
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free == 4 and not any(bm.allocator.ref_counts)
    probe = seq_of([5, 6, 7, 8, 1])
    assert bm.cached_prefix(probe) == table[:2]
    taken = bm.allocator.allocate(2)                             # the 2 empty blocks go first
    assert set(taken).isdisjoint(table[:2])
    assert bm.cached_prefix(probe) == table[:2]
    (evicted,) = bm.allocator.allocate(1)                        # then the tail of the prefix
    assert evicted == table[1] and bm.cached_prefix(probe) == table[:1]
    assert bm.allocator.evictions == 1
    bm.allocator.release(taken + [evicted])
    # A hit on a free cached block takes it back out of the free pool.
    assert bm.admit(probe, bm.cached_prefix(probe), len(probe))
    assert bm.num_free == 4 - 3 and bm.allocator.ref_counts[table[0]] == 1   # 1 hit + 2 new


def test_admit_counts_the_free_cached_blocks_it_takes_and_changes_nothing_when_short():
    bm = BlockManager(4, 2, enable_caching=True)
    bm.free(computed(bm, [5, 6, 7, 8, 9]))
    big = seq_of([5, 6, 7, 8] + [1] * 5)                         # 2 cached + 3 new blocks > 4
    hit = bm.cached_prefix(big)
    assert len(hit) == 2 and not bm.admit(big, hit, len(big))
    assert big.block_table == [] and bm.num_free == 4 and not any(bm.allocator.ref_counts)
    assert bm.queries == 5                                       # the failed admission counts nothing


def test_an_evicted_block_reused_by_another_prefix_is_cached_under_its_new_key():
    bm = BlockManager(3, 2, enable_caching=True)
    a = computed(bm, [5, 6, 7, 8, 9])                            # [5 6] [7 8] cached, [9] not
    old = list(a.block_table)
    bm.free(a)
    other = computed(bm, [8, 9, 1, 2, 3])                        # evicts [7 8], then [5 6]
    assert other.block_table == [old[2], old[1], old[0]] and bm.allocator.evictions == 2
    assert bm.cached_prefix(seq_of([5, 6, 7, 8, 0])) == []
    bm.free(other)
    assert bm.cached_prefix(seq_of([8, 9, 1, 2, 0])) == [old[2], old[1]]
    assert list(bm.allocator.empty) == [old[0]]                  # the block of [3] holds no prefix


def test_blocks_filled_while_decoding_are_cached_under_their_full_tokens():
    bm = BlockManager(16, 4, enable_caching=True)
    s = seq_of(list(range(10, 20)))                              # 2 full blocks + 2 tokens
    assert bm.admit(s, [], len(s))
    s.num_cached = len(s)
    bm.commit(s)
    s.token_ids += [20, 21, 22]                                  # decoding fills block 2
    bm.grow(s, len(s))
    s.num_cached = len(s)
    bm.commit(s)
    assert bm.cached_prefix(seq_of(list(range(10, 22)) + [0])) == s.block_table[:3]
    assert (bm.queries, bm.hits) == (10, 0)
    hit = seq_of(list(range(10, 22)) + [1])
    assert bm.admit(hit, bm.cached_prefix(hit), len(hit))
    again = seq_of(list(range(10, 14)) + [2])
    assert bm.admit(again, bm.cached_prefix(again), len(again))
    assert (bm.queries, bm.hits) == (10 + 13 + 5, 12 + 4)       # hits add up over admissions


def test_admission_may_take_exactly_every_free_block():
    bm = BlockManager(4, 2, enable_caching=True)
    bm.free(computed(bm, [5, 6, 7, 8, 9]))                       # 2 blocks cached, all 4 free
    s = seq_of([5, 6, 7, 8, 1, 2, 3])                            # 2 hits + 2 new = 4
    assert bm.admit(s, bm.cached_prefix(s), len(s)) and bm.num_free == 0


def test_truncate_gives_back_the_blocks_past_the_kept_tokens():
    bm = BlockManager(8, 4)
    s = seq_of(list(range(3, 14)))                               # 11 tokens: 3 blocks
    assert bm.admit(s, [], len(s))
    s.num_cached = 11
    table = list(s.block_table)
    bm.truncate(s, 6)
    assert s.block_table == table[:2] and s.num_cached == 6 and bm.num_free == 6
    bm.truncate(s, 8)                                            # nothing to give back
    assert s.block_table == table[:2] and s.num_cached == 6


def test_speculative_rollback_cannot_cut_committed_blocks():
    bm = BlockManager(8, 4, enable_caching=True)
    s = computed(bm, list(range(3, 12)))                         # 2 committed blocks
    bm.truncate(s, 8)                                            # down to the committed end: fine
    with pytest.raises(ValueError, match="committed to the prefix cache"):
        bm.truncate(s, 7)


# ------------------------------------------------------------------------------------------ engines


def run(engine: LLMEngine, prompts, params):
    guard = WriteGuard(engine)
    try:
        return [o.token_ids for o in LLM.from_engine(engine).generate(prompts, params)]
    finally:
        guard.remove()


PLAIN = dict(enable_prefix_caching=False, enable_chunked_prefill=False)
CONFIGS = {"cache": {}, "cache-whole-prompts": dict(enable_chunked_prefill=False),
           "cache-chunk16": dict(max_num_batched_tokens=16, max_num_seqs=8),
           "chunk24-no-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=24,
                                    max_num_seqs=8)}


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that share a 40-token system prompt, two duplicates and a 48-token prompt cached in
    full; half greedy, half seeded."""
    system = random_ids(40, 1)
    prompts = [system + random_ids(3 + 5 * i, 10 + i) for i in range(5)]
    prompts += [prompts[1], random_ids(48, 2), random_ids(48, 2)]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=0.9, top_k=50, seed=i, max_tokens=20, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


@pytest.fixture(scope="module", params=["llama", "mla", "int4"])
def model(request):
    path = {"llama": LLAMA, "mla": MLA, "int4": LLAMA}[request.param]
    return request.param, LLM(path, device="cpu", dtype="float32", max_kv_tokens=4096,
                              quant="int4" if request.param == "int4" else None)


def test_outputs_are_identical_with_caching_and_chunking_on_or_off(model):
    name, model = model
    # INT4's reference matmul is slow on a CPU: one configuration, caching and chunking both on.
    configs = {k: CONFIGS[k] for k in (["cache-chunk16"] if name == "int4" else CONFIGS)}
    prompts, params = workload()
    want = run(engine_for(model, **PLAIN), prompts, params)
    # Round 2 continues each conversation: prompt + output + a new turn (blocks filled while
    # decoding are cached too).
    prompts2 = [p + o + random_ids(6, 30 + i) for i, (p, o) in enumerate(zip(prompts, want))]
    want2 = run(engine_for(model, **PLAIN), prompts2, params)
    for name, options in configs.items():
        engine = engine_for(model, **options)
        assert run(engine, prompts, params) == want, name
        assert run(engine, prompts2, params) == want2, name
        if engine.blocks.enable_caching:
            assert engine.stats["prefix_cache_hits"] > 0.5 * engine.stats["prefix_cache_queries"]
        assert_all_free(engine)


@pytest.fixture(scope="module")
def llama():
    return LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=4096)


def test_hit_counts_of_a_constructed_workload(llama):
    engine = engine_for(llama)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    heads = [random_ids(48, 100 + i) for i in range(8)]          # 3 full blocks each, all different
    run(engine, [h + random_ids(5, 200 + i) for i, h in enumerate(heads)], one)
    assert engine.stats["prefix_cache_hits"] == 0 and engine.stats["prefix_cache_queries"] == 8 * 53
    run(engine, [h + random_ids(7, 300 + i) for i, h in enumerate(heads)], one)
    assert engine.stats["prefix_cache_hits"] == 8 * 3 * 16
    # 8 prompts sharing a new 3-block prefix, sent together: the first computes it, the other 7 wait
    # one step for it and hit it.
    shared = random_ids(48, 400)
    run(engine, [shared + random_ids(4, 500 + i) for i in range(8)], one)
    assert engine.stats["prefix_cache_hits"] == 8 * 3 * 16 + 7 * 3 * 16
    # A prompt cached in full: its last block is recomputed (the last token's logits are needed).
    got = run(engine, [shared], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert engine.stats["prefix_cache_hits"] == 8 * 3 * 16 + 7 * 3 * 16 + 2 * 16
    assert got == run(engine_for(llama, **PLAIN), [shared],
                      SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert_all_free(engine)


def test_a_prompt_starting_with_a_block_cached_at_another_position_gets_its_own_tokens(llama):
    # Warm the cache with A + B, then run prompts that start with B (and with B twice): equal
    # blocks at other positions hold other K/V, so the tokens must be those of an engine without
    # a cache.
    A, B = random_ids(32, 600), random_ids(32, 601)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    probes = [B + random_ids(5, 602), B + B + random_ids(3, 603), B + A + random_ids(4, 604)]
    want = run(engine_for(llama, **PLAIN), probes, greedy)
    cold = engine_for(llama)
    run(cold, probes, greedy)                                  # the hits the probes share (block B)
    engine = engine_for(llama)
    run(engine, [A + B + random_ids(4, 605)], greedy)
    assert run(engine, probes, greedy) == want
    # Nothing of A + B is a prefix of these: only the hits they give each other.
    assert engine.stats["prefix_cache_hits"] == cold.stats["prefix_cache_hits"] == 2 * 32
    assert_all_free(engine)


def test_eviction_and_preemption_under_kv_pressure_lose_nothing(llama):
    prompts, params = workload()
    params = [replace(p, max_tokens=40) for p in params]
    want = run(engine_for(llama, **PLAIN), prompts, params)
    tiny = LLM(LLAMA, device="cpu", dtype="float32", max_kv_tokens=14 * 16, max_num_seqs=8,
               max_num_batched_tokens=32)
    for _ in range(2):                                           # the second round hits, evicts
        assert run(tiny.engine, prompts, params) == want
    stats = tiny.stats
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert tiny.engine.blocks.allocator.evictions > 0
    assert_all_free(tiny.engine)
