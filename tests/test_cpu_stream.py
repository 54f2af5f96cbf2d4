"""The float32 residual stream of a half-precision model on a CPU (tinyinfer/layers/norm.py:
residual_stream; ops/reference.py and cpu/norm.h: fused_add_rmsnorm with a float32 residual): the
stream is x + residual in float32 and the norm is rounded once, to x's dtype -- the reference and the
C++ loop each against float64, and against each other; a bfloat16 model's layers hand on a float32
stream on the per-op path (the fused step's equality with it: tests/test_fused_cpu.py).
"""
from __future__ import annotations

import pytest
import torch

from fused_util import NORM_TOL, bits
from hf_util import LLAMA
from tinyinfer import LLM, ops
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.layers.attention import AttentionMetadata
from tinyinfer.layers.norm import residual_stream
from tinyinfer.ops import reference


def _inputs(rows: int, d: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(rows, d, generator=gen)).to(dtype)
    residual = 3 * torch.randn(rows, d, generator=gen)                          # float32
    weight = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel", ["reference", "cpp"])
def test_a_float32_stream_is_added_in_float32_and_normed_with_one_rounding(kernel, dtype, rows):
    if kernel == "cpp" and cpu_kernels.library() is None:
        pytest.skip("no C++ CPU kernel library")
    fn = reference.fused_add_rmsnorm if kernel == "reference" else ops.fused_add_rmsnorm
    for d in (576, 37):
        x, residual, weight = _inputs(rows, d, dtype, rows + d)
        y, stream = fn(x, residual, weight, 1e-6)
        assert y.dtype == dtype and stream.dtype == torch.float32
        assert torch.equal(bits(stream), bits(x.float() + residual))            # one float32 add
        s = stream.double()
        want = weight.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6)
        u = torch.finfo(dtype).eps / 2                # one rounding to dtype (2^-25 under fp16's normals)
        assert ((y.double() - want).abs() <= want.abs() * (u + 3e-5) + 2.0 ** -25).all()
        torch.testing.assert_close(y, reference.fused_add_rmsnorm(x, residual, weight, 1e-6)[0],
                                   **NORM_TOL[dtype])


def test_the_bound_fails_for_the_model_dtype_stream():
    # The same inputs with the stream rounded to bfloat16 first (the GPU's arithmetic) break the
    # one-rounding bound somewhere: the test above can tell the two apart.
    x, residual, weight = _inputs(16, 576, torch.bfloat16, 1)
    y, _ = reference.fused_add_rmsnorm(x, residual.bfloat16(), weight, 1e-6)
    s = x.double() + residual.double()
    want = weight.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6)
    assert not ((y.double() - want).abs() <= want.abs() * (2.0 ** -8 + 3e-5)).all()


def test_residual_stream_is_float32_for_half_precision_on_a_cpu_only():
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert residual_stream(torch.ones(2, 4, dtype=dtype)).dtype == want


@torch.inference_mode()
def test_a_bfloat16_models_layers_hand_on_a_float32_stream():
    llm = LLM(LLAMA, device="cpu", dtype="bfloat16", max_kv_tokens=64)
    model, cfg = llm.engine.runner.model, llm.config
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, out: seen.append((out[0].dtype, out[1].dtype)))
             for layer in model.layers]
    n = 5
    caches = [(torch.zeros(2, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16),
               torch.zeros(2, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16))
              for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(2, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_q_len=n, query_start_loc_host=[0, n], seq_lens_host=[n], prefill=True)
    hidden = model(torch.arange(n), torch.arange(n), meta, caches)
    for h in hooks:
        h.remove()
    assert hidden.dtype == torch.bfloat16 and not hidden.isnan().any()
    assert seen == [(torch.bfloat16, torch.float32)] * len(model.layers)
