"""The Q8_0 embedding and lm_head (tinyinfer/layers/q8.py, cpu/q8_linear.h): the kernel against float64 of
the dequantized weight within the bound its 15-bit activations allow, for row counts around its 8-row
groups and tables whose rows do not fill its 16-column groups; the packed layout unpacking to the file's
bytes; the file's Q8_0 bytes read as gguf's own dequantization reads them; and SmolLM2 loaded on a CPU
holding its tied table once, as int8 levels shared by the embedding and the head, no dense copy anywhere.
"""
from __future__ import annotations

import pytest
import torch

from gguf_util import smollm2_gguf
from tinyinfer import LLM, ops
from tinyinfer.layers.q8 import Q8Embedding, Q8Head, pack_q8
from tinyinfer.loading.gguf import load_gguf
from tinyinfer.ops import reference


def _table(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qs = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-4).half()
    return qs, d


def _check_product(y: torch.Tensor, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor,
                   on_grid: bool = False) -> None:
    """y within the kernel's bound of the float64 product x W^T, W = d q: each activation is held as
    two int8 levels on its 32-block's grid, dx (q1 + q2 / 256) with dx = max|x| / 127, off by at most
    dx / 512 (dx / 256 where q2 is clipped to 127), so a logit by at most sum_k |w_k| dx_k / 256;
    float32 rounds each block's sum, scale and product and the running total (K/32 + 4 roundings of at
    most the row's |x| . |w|). on_grid: x is exact on the int8 grid (no first term)."""
    m, k = x.shape
    w = qs.double() * d.double().repeat_interleave(32, dim=1)                  # (N, K) float64
    xd = x.double()
    dx = xd.abs().view(m, k // 32, 32).amax(-1) / 127                          # (M, K/32)
    act = 0 if on_grid else (dx.repeat_interleave(32, dim=1) / 256) @ w.abs().T * (1 + 1e-3)
    rnd = (k // 32 + 4) * torch.finfo(torch.float32).eps * (xd.abs() @ w.abs().T)
    assert y.dtype == torch.float32 and y.shape == (m, qs.shape[0])
    assert ((y.double() - xd @ w.T).abs() <= act + rnd + 1e-30).all()


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_q8_linear_is_the_float64_product_within_its_activations_bound(rows, dtype, seed):
    qs, d = _table(1000, 576, seed)                                             # 1000 = 62 * 16 + 8
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x[0, :32] = 0                                                               # an all-zero block
    packed, scales = pack_q8(qs, d)
    y = ops.q8_linear(x, packed, scales, 1000)
    _check_product(y, x, qs, d)
    # each row's result does not depend on the rows beside it
    assert torch.equal(ops.q8_linear(x[-1:], packed, scales, 1000), y[-1:])


def test_activations_on_the_int8_grid_leave_only_float32_rounding():
    # x = 2^-4 * integers with each block's largest 127 * 2^-4: the int8 rounding is exact, so the
    # logits are the float64 product within float32 rounding alone -- which a weight one level off,
    # times an activation of 127 / 16, breaks.
    qs, d = _table(48, 64, 5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(-127, 128, (5, 64), generator=gen).float() / 16
    x[:, ::32] = 127 / 16
    packed, scales = pack_q8(qs, d)
    y = ops.q8_linear(x, packed, scales, 48)
    _check_product(y, x, qs, d, on_grid=True)
    wrong = qs.clone()
    wrong[7, 32] = wrong[7, 32] + (1 if wrong[7, 32] < 127 else -1)
    with pytest.raises(AssertionError):
        _check_product(ops.q8_linear(x, *pack_q8(wrong, d), 48), x, qs, d, on_grid=True)


def test_pack_q8_unpacks_to_the_file_levels():
    qs, d = _table(37, 96, 2)
    packed, scales = pack_q8(qs, d)
    assert packed.shape == (3, 24, 16, 4) and packed.dtype == torch.uint8 and scales.shape == (3, 3, 16)
    back_q, back_d = reference.q8_unpack(packed, scales, 37)
    assert torch.equal(back_q, qs) and torch.equal(back_d, d)
    emb = Q8Embedding(qs, d, torch.float32)
    ids = torch.tensor([[0, 36], [17, 16]])
    assert torch.equal(emb(ids), reference.q8_dequantize(qs, d)[ids])


def test_q8_linear_refuses_a_table_of_the_wrong_kind():
    qs, d = _table(64, 64, 0)
    packed, scales = pack_q8(qs, d)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.q8_linear(torch.randn(1, 64), packed.view(torch.int8), scales, 64)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.q8_linear(torch.randn(1, 64), packed, scales, 80)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q8Embedding(qs[:, :48], d[:, :1], torch.float32)


@pytest.fixture(scope="module")
def smollm2():
    return LLM(smollm2_gguf(), device="cpu", max_kv_tokens=256)


def test_the_file_q8_0_bytes_are_gguf_own_dequantized_values():
    tensor = load_gguf(smollm2_gguf()).tensors["model.embed_tokens.weight"]
    qs, d = tensor.q8_0()
    assert qs.dtype == torch.int8 and d.dtype == torch.float16
    assert torch.equal(reference.q8_dequantize(qs, d), tensor.dense(torch.float32))


def test_smollm2_on_a_cpu_holds_its_tied_table_once_as_q8_0(smollm2):
    model = smollm2.engine.runner.model
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, Q8Embedding) and isinstance(head, Q8Head)
    assert head.embedding[0] is emb
    # no tensor of the table's shape other than its int8 levels: no dense copy, no reordered copy
    big = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() >= emb.packed.numel()]
    assert [t.data_ptr() for t in big] == [emb.packed.data_ptr()]
    ids = torch.tensor([0, 5, 49151, 1000])
    tensor = load_gguf(smollm2_gguf()).tensors["model.embed_tokens.weight"]
    assert torch.equal(emb(ids), tensor.dense(torch.float32)[ids].to(smollm2.dtype))


def test_the_q8_head_gives_the_logits_of_its_dequantized_weight(smollm2):
    model = smollm2.engine.runner.model
    hidden = torch.randn(3, model.cfg.hidden_size).to(smollm2.dtype)
    got = model.compute_logits(hidden)
    _check_product(got, hidden, *model.embed_tokens.levels())


def test_q8_linear_portable_build_without_avx512_is_the_float64_product_too():
    # The loop a CPU without AVX-512 runs (as tests/test_cpu_kernels.py builds it, under another name).
    from tinyinfer.extensions import cpu as cpu_kernels
    cpu_kernels.compile_library(cpu_kernels.PORTABLE_FLAGS + ["-mno-avx512f"], name="tinyinfer_cpu_portable")
    qs, d = _table(200, 96, 3)                                                  # 200 = 12 * 16 + 8
    x = torch.randn(11, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    packed, scales = pack_q8(qs, d)
    y = torch.ops.tinyinfer_cpu_portable.q8_linear(x, packed, scales, 200)
    _check_product(y, x, qs, d)
    # the same integer sums as the native kernel: within float32 rounding of it
    assert torch.allclose(y, ops.q8_linear(x, packed, scales, 200), rtol=1e-5, atol=1e-5)
