"""The quantized KV cache's ops (ops/kv_quant.py, docs/kv-cache.md), on every CPU path: the C++ library of
cpu/ and the pure-PyTorch fallback, beside the reference.

The K/V write against an independent formula: each row's scale in float64 (amax / 127 for int8, / 448
for fp8, rounded to the stored float16), int8's x / s rounded half to even, fp8 torch's own e4m3 cast of
x / s computed in float64 (saturating at 448); -1 slots untouched. Paged attention over a quantized cache (decode, verify,
varlen with empty sequences, MQA, MLA's latent view sharing K's scales) against float64 attention of the
dequantized values (q * s in float64), through ops.paged_attention, the reference and the long-query
gather path (paged_prefill_attention).
"""
from __future__ import annotations

import pytest
import torch

from paged_util import CPU_CASES, make_batch
from test_cpu_kernels import path  # noqa: F401  (the fixture: C++ library / PyTorch fallback)
from tinyinfer import ops
from tinyinfer.ops import reference
from tinyinfer.ops.kv_quant import KV_CACHE_DTYPES, quantize

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def expected_scales(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """float64: s = fp16(max(amax / qmax, 2^-14)), (T, H)."""
    return (x.double().abs().amax(-1) / qmax).clamp(min=2.0 ** -14).half()


def expected_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = clamp(round_half_even(x / s), -127, 127) in float64."""
    s = expected_scales(x, 127)
    ratio = x.double() / s.double()[..., None]
    return ratio.round().clamp(-127, 127).to(torch.int8), s


def expected_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = e4m3(clamp(x / s, -448, 448)), x / s in float64, torch's cast."""
    s = expected_scales(x, 448)
    return (x.double() / s.double()[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn), s


def rows(T: int, H: int, D: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, D, generator=g) * torch.logspace(-3, 2, T)[:, None, None]   # 5 decades
    x[0] = 0.0                                     # an all-zero row: the scale's floor, zeros back
    x[1, 0, 3] = 5000.0                            # an outlier: the row's scale follows it
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_store_kv_quantizes_as_the_formula_says(path, kind, dtype):
    T, H, D, NB, BS = 24, 3, 32, 6, 8
    k, v = rows(T, H, D, dtype, 1), rows(T, H, D, dtype, 2)
    slots = torch.randperm(NB * BS, generator=torch.Generator().manual_seed(3))[:T]
    slots[5] = -1                                              # padding: written nowhere
    cache_dtype = KV_CACHE_DTYPES[kind]
    caches = [torch.zeros(NB, BS, H, D, dtype=cache_dtype) for _ in range(2)]
    scales = [torch.full((NB, BS, H), -1.0, dtype=torch.float16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    ref_scales = [s.clone() for s in scales]
    ops.store_kv(k, v, *caches, slots, *scales)
    reference.store_kv(k, v, *ref_caches, slots, *ref_scales)
    keep = slots >= 0
    blk, off = slots[keep] // BS, slots[keep] % BS
    for x, cache, scale, ref_cache, ref_scale in zip((k, v), caches, scales, ref_caches, ref_scales):
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), "kernel != reference"
        assert torch.equal(scale, ref_scale)
        written = torch.zeros(NB, BS, dtype=torch.bool)
        written[blk, off] = True
        assert not cache[~written].view(torch.uint8).any(), "a slot nobody wrote was touched"
        got = cache[blk, off]
        want, want_s = (expected_int8 if kind == "int8" else expected_fp8)(x[keep])
        assert torch.equal(scale[blk, off], want_s)
        assert (scale[~written] == -1).all()
        if kind == "int8":
            # Exact, except where x / s lies within float32 rounding of a .5 tie.
            ratio = x[keep].double() / want_s.double()[..., None]
            tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-5
            assert torch.equal(got[~tie], want[~tie])
            assert ((got[tie].int() - want[tie].int()).abs() <= 1).all()
            assert (got[0] == 0).all() and int(got.abs().max()) == 127
        else:
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            big = want_s.float() > 2.0 ** -14                          # rows not at the scale's floor
            assert (got.float().abs().amax(-1)[big] == 448).all(), "each row's amax maps to 448"
            assert (got[0].float() == 0).all() and not got.float().isnan().any()


def quantized_batch(name: str, dtype: torch.dtype, kind: str):
    """A CPU_CASES batch whose caches are quantized, and the per-sequence dequantized K/V in float64."""
    seq_lens, q_lens, hq, hkv, d, dv, bs, mla = CPU_CASES[name]
    b = make_batch(seq_lens, q_lens, hq, hkv, d, dv, bs, dtype, mla=mla, seed=len(name))
    cache_dtype = KV_CACHE_DTYPES[kind]
    nb = b.k_cache.shape[0]
    # Unused slots poisoned: fp8 bytes 0x7F (NaN in torch, 480 s in the C++ decode: an outlier either
    # way), int8 scales NaN.
    k_cache = torch.full((nb, bs, hkv, d), 0x7F, dtype=torch.uint8).view(cache_dtype)
    v_cache = k_cache[..., :dv] if mla else k_cache[..., :dv].clone()
    k_scale = torch.full((nb, bs, hkv), float("nan"), dtype=torch.float16)
    v_scale = k_scale if mla else k_scale.clone()
    keys, values = [], []
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        slots = b.block_tables[i].long()[pos // bs] * bs + pos % bs
        ops.store_kv(b.keys[i], None if mla else b.values[i], k_cache, None if mla else v_cache, slots,
                     k_scale, None if mla else v_scale)
        qk, sk = quantize(b.keys[i], cache_dtype)
        kd = qk.double() * sk.double()[..., None]                  # (n, hkv, d) the values attention reads
        keys.append(kd)
        if mla:
            values.append(kd[..., :dv])
        else:
            qv, sv = quantize(b.values[i], cache_dtype)
            values.append(qv.double() * sv.double()[..., None])
    b.keys, b.values, b.k_cache, b.v_cache = keys, values, k_cache, v_cache
    return b, k_scale, v_scale


def float64_attention(b) -> torch.Tensor:
    T, hq, _ = b.q.shape
    hkv, dv = b.k_cache.shape[2], b.v_cache.shape[-1]
    out = torch.zeros(T, hq, dv, dtype=torch.float64)
    starts = b.query_start_loc.tolist()
    for s, n in enumerate(b.seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        for i, t in enumerate(range(q0, q1)):
            visible = n - (q1 - q0) + i + 1
            for h in range(hq):
                k, v = b.keys[s][:visible, h // (hq // hkv)], b.values[s][:visible, h // (hq // hkv)]
                out[t, h] = torch.softmax((k @ b.q[t, h].double()) * b.scale, dim=0) @ v
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_paged_attention_over_a_quantized_cache_matches_float64(path, name, kind, dtype):
    b, k_scale, v_scale = quantized_batch(name, dtype, kind)
    want = float64_attention(b)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale)
    for fn in (ops.paged_attention, reference.paged_attention):
        got = fn(*args, k_scale, v_scale)
        assert got.dtype == dtype and not got.isnan().any()
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    # The long-query path (host lengths, whole blocks gathered and dequantized, SDPA).
    got = reference.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                            b.seq_lens.tolist(), b.query_start_loc.tolist(), b.scale,
                                            k_scale, v_scale)
    t = int(b.query_start_loc[-1])
    torch.testing.assert_close(got[:t].double(), want[:t], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_decodes_every_e4m3_byte_exactly(path, dtype):
    """One cached key: attention's output is its V row, dequantized. The row holds all 254 finite e4m3
    bytes (normal and subnormal, both signs; the two NaN bytes as 0): each must come back as torch's
    own e4m3 value times the scale, in float32 exactly (a float32 q; bfloat16 rounds it once)."""
    D = 256
    v = torch.arange(256, dtype=torch.uint8)
    v[[0x7F, 0xFF]] = 0
    v_cache = torch.zeros(2, 16, 1, D, dtype=torch.uint8)
    v_cache[1, 0, 0] = v
    v_cache = v_cache.view(torch.float8_e4m3fn)
    k_cache = torch.zeros_like(v_cache)
    scale = torch.full((2, 16, 1), 0.0371, dtype=torch.float16)           # one per slot and head
    i32 = dict(dtype=torch.int32)
    got = ops.paged_attention(torch.zeros(1, 1, D, dtype=dtype), k_cache, v_cache,
                              torch.tensor([[1]], **i32), torch.tensor([1], **i32),
                              torch.tensor([0, 1], **i32), 0.125, scale, scale)
    want = (v.view(torch.float8_e4m3fn).float() * scale[1, 0].float()).to(dtype)
    assert torch.equal(got[0, 0], want)


def test_quantization_error_is_what_the_format_allows():
    # The formula's own bound, as a sanity check of the scales: int8 |x - x'| <= s / 2 per element;
    # e4m3 keeps 3 mantissa bits, so |x - x'| <= 2^-4 |x| for values in its normal range.
    x = rows(64, 2, 64, torch.float32, 7)[2:]
    q, s = quantize(x, torch.int8)
    assert ((q.double() * s.double()[..., None] - x.double()).abs() <= s.double()[..., None] / 2 + 1e-9).all()
    q, s = quantize(x, torch.float8_e4m3fn)
    back = q.double() * s.double()[..., None]
    normal = (x.double().abs() / s.double()[..., None] >= 2.0 ** -6)
    assert ((back - x.double()).abs()[normal] <= 2.0 ** -4 * x.double().abs()[normal] + 1e-12).all()
    amax = x.double().abs().amax(-1)
    assert torch.allclose(back.abs().amax(-1), amax, rtol=2.0 ** -4), "a row's amax comes back"
