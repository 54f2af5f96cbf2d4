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
