"""The reference K/V write (ops/reference.py store_kv) -- the contract every store_kv kernel is checked
against -- against the contract itself, written out token by token: token t with slot s >= 0 lands in
block s // block_size at offset s % block_size, bit for bit; slot -1 is padding; every other cache row
is left alone. The slots include 0 and the last slot of the pool, the two ends a bound can miss."""
from __future__ import annotations

import pytest
import torch

from tinyinfer import ops
from tinyinfer.ops import reference

NUM_BLOCKS, BS = 6, 4


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mla", [False, True], ids=["k_and_v", "latent_k_only"])
def test_each_token_lands_in_its_slot_and_nothing_else_changes(seed, dtype, mla):
    gen = torch.Generator().manual_seed(seed)
    T, H, D = 11, 2, 8
    slots = torch.randperm(NUM_BLOCKS * BS - 2, generator=gen)[:T - 3] + 1       # distinct, not 0 / last
    slots = torch.cat([torch.tensor([0, NUM_BLOCKS * BS - 1, -1]), slots])[torch.randperm(T, generator=gen)]
    k = torch.randn(T, H, D, generator=gen).to(dtype)
    v = None if mla else torch.randn(T, H, D, generator=gen).to(dtype)
    k_cache = torch.full((NUM_BLOCKS, BS, H, D), float("nan"), dtype=dtype)
    v_cache = None if mla else torch.full((NUM_BLOCKS, BS, H, D), float("nan"), dtype=dtype)
    want_k = k_cache.clone()
    want_v = None if mla else v_cache.clone()
    for t, s in enumerate(slots.tolist()):                  # the contract, one token at a time
        if s >= 0:
            want_k[s // BS, s % BS] = k[t]
            if not mla:
                want_v[s // BS, s % BS] = v[t]
    for store in (reference.store_kv, ops.store_kv):        # the reference, and the op on this device
        got_k, got_v = k_cache.clone(), None if mla else v_cache.clone()
        store(k, v, got_k, got_v, slots)
        assert torch.equal(_bits(got_k), _bits(want_k)), f"{store.__name__}: k_cache (seed {seed})"
        if not mla:
            assert torch.equal(_bits(got_v), _bits(want_v)), f"{store.__name__}: v_cache (seed {seed})"
    assert not torch.isnan(want_k[0, 0]).any(), "slot 0 must be among the written ones"
