"""The Q8_0 embedding and lm_head (tinyinfer/layers/q8.py, cpu/q8_linear.h): the kernel against float64 of
the dequantized weight, for row counts around its 8-row groups; the file's Q8_0 bytes read as gguf's
own dequantization reads them; and SmolLM2 loaded on a CPU holding its tied table once, as int8 levels
shared by the embedding and the head, with no dense copy of it anywhere.
"""
from __future__ import annotations

import pytest
import torch

from gguf_util import smollm2_gguf
from tinyinfer import LLM, ops
from tinyinfer.layers.q8 import Q8Embedding, Q8Head
from tinyinfer.loading.gguf import load_gguf
from tinyinfer.ops import reference


def _table(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qs = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-4).half()
    return qs, d


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_q8_linear_is_the_float64_product_with_the_dequantized_weight(rows, dtype, seed):
    qs, d = _table(1000, 576, seed)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = ops.q8_linear(x, qs, d)
    w = qs.double() * d.double().repeat_interleave(32, dim=1)                  # (N, K) float64
    ref = x.double() @ w.T
    bound = 4 * 576 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().T)
    assert y.dtype == torch.float32 and y.shape == (rows, 1000)
    assert ((y.double() - ref).abs() <= bound + 1e-30).all()
    # each row's result does not depend on the rows beside it
    assert torch.equal(ops.q8_linear(x[-1:], qs, d), y[-1:])


def test_q8_linear_refuses_a_table_of_the_wrong_kind():
    qs, d = _table(64, 64, 0)
    with pytest.raises(RuntimeError, match="int8"):
        ops.q8_linear(torch.randn(1, 64), qs.to(torch.uint8), d)
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
    big = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() >= emb.qs.numel()]
    assert [t.data_ptr() for t in big] == [emb.qs.data_ptr()]
    ids = torch.tensor([0, 5, 49151, 1000])
    tensor = load_gguf(smollm2_gguf()).tensors["model.embed_tokens.weight"]
    assert torch.equal(emb(ids), tensor.dense(torch.float32)[ids].to(smollm2.dtype))


def test_the_q8_head_gives_the_logits_of_its_dequantized_weight(smollm2):
    model = smollm2.engine.runner.model
    hidden = torch.randn(3, model.cfg.hidden_size).to(smollm2.dtype)
    w = reference.q8_dequantize(model.embed_tokens.qs, model.embed_tokens.d).double()
    ref = hidden.double() @ w.T
    got = model.compute_logits(hidden)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_q8_linear_portable_build_without_avx512_is_the_float64_product_too():
    # The loop a CPU without AVX-512 runs (as tests/test_cpu_kernels.py builds it, under another name).
    from tinyinfer.extensions import cpu as cpu_kernels
    cpu_kernels.compile_library(cpu_kernels.PORTABLE_FLAGS + ["-mno-avx512f"], name="tinyinfer_cpu_portable")
    qs, d = _table(200, 96, 3)
    x = torch.randn(11, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = torch.ops.tinyinfer_cpu_portable.q8_linear(x, qs, d)
    w = qs.double() * d.double().repeat_interleave(32, dim=1)
    bound = 4 * 96 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.abs().T)
    assert ((y.double() - x.double() @ w.T).abs() <= bound + 1e-30).all()
