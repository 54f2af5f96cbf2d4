"""BlockAllocator bookkeeping: capacity, double free, ref counts, sizes that must be positive."""
import pytest

from tinyinfer.engine.block_manager import BlockAllocator, BlockManager, OutOfBlocks


def test_allocates_distinct_blocks_up_to_capacity_then_raises():
    a = BlockAllocator(8)
    blocks = a.allocate(5) + a.allocate(3)
    assert sorted(blocks) == list(range(8)) and a.num_free == 0
    with pytest.raises(OutOfBlocks, match="only 0 of 8"):
        a.allocate(1)


def test_double_free_raises():
    a = BlockAllocator(4)
    b = a.allocate(2)
    a.release(b)
    with pytest.raises(ValueError, match="double free"):
        a.release(b[:1])


def test_shared_block_returns_only_after_last_owner_releases():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    a.share(b)
    a.release([b])
    assert a.num_free == 3
    a.release([b])
    assert a.num_free == 4


def test_sharing_a_free_block_raises():
    with pytest.raises(ValueError, match="not allocated"):
        BlockAllocator(2).share(0)


def test_pool_and_block_sizes_must_be_positive():
    BlockAllocator(1)
    BlockManager(1, 1)
    with pytest.raises(ValueError, match="num_blocks must be positive, got 0"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        BlockManager(4, 0)


def test_allocate_takes_one_block_by_default_and_release_checks_the_range():
    a = BlockAllocator(4)
    assert len(a.allocate()) == 1 and a.num_free == 3
    for bad in (4, -1):
        with pytest.raises(ValueError) as err:
            a.release([bad])
        assert str(err.value) == f"block id {bad} out of range [0, 4)"


# --- the pool's size (engine/kv_cache.py): a fixed budget, capped, changeable, checked -------------

def test_pool_size_is_fixed_whatever_memory_is_free(monkeypatch):
    """Same command, same pool: the CPU default is a fixed 4 GiB budget, not a share of free RAM."""
    import torch
    from tinyinfer.engine import kv_cache
    cpu = torch.device("cpu")
    sizes = set()
    for free in (3 << 30, 9 << 30, 20 << 30):
        monkeypatch.setattr(kv_cache, "available_bytes", lambda device, free=free: free)
        sizes.add(kv_cache.pool_tokens(cpu, 23040, 8192, 256))      # SmolLM2's KV bytes a token
    assert sizes == {kv_cache.DEFAULT_CPU_KV_BYTES // 23040}
    assert kv_cache.pool_tokens(cpu, 23040, 8192, 4) == 8192 * 4     # capped by context x sequences
    assert kv_cache.pool_tokens(cpu, 1000, 8192, 256, kv_memory=10**6) == 1000


def test_parse_bytes():
    from tinyinfer.engine.kv_cache import parse_bytes
    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("2.5GB") == 2_500_000_000 and parse_bytes("1000") == 1000
    assert parse_bytes(4096) == 4096
    for bad in ("4 parsecs", "", "-1GiB", 0, True, 1.5):
        with pytest.raises(ValueError, match="kv_cache_memory="):
            parse_bytes(bad)


def test_engine_pool_option_cap_and_error(monkeypatch):
    from hf_util import LLAMA
    from tinyinfer import LLMEngine
    from tinyinfer.engine import kv_cache
    engine = LLMEngine(LLAMA, device="cpu", max_num_seqs=3)
    assert engine.kv_tokens == 3 * engine.config.max_context           # all 3 sequences can hold
    kv = engine.runner.kv
    per_token = sum(t.nbytes for t in kv.k_caches + kv.v_caches) // engine.kv_tokens
    assert LLMEngine(LLAMA, device="cpu", kv_cache_memory="1MiB").kv_tokens == (1 << 20) // per_token
    monkeypatch.setattr(kv_cache, "available_bytes", lambda device: 1 << 19)
    with pytest.raises(ValueError, match=r"KV cache needs 1\.0 MiB but only 0\.5 MiB of RAM available"
                                         r".*lower --kv-cache-memory"):
        LLMEngine(LLAMA, device="cpu", kv_cache_memory="1MiB")
