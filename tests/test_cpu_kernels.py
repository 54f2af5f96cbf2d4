"""The CPU kernels of the ops (tinyinfer/ops/cpu.py): the C++ library of cpu/ (native build, and a
portable build without AVX-512 loaded beside it) and the pure-PyTorch paths used where it cannot be
built, each against the op's reference and float64.

paged_attention: float64 attention over batches built the hard way (shuffled tables, NaN in every slot
no sequence owns, varlen queries, padding rows), in float32, bfloat16 and float16, scores that span
more than e^87 (the exp's flush to zero), and lengths at block multiples and one past. rope_store_kv,
store_kv: the reference's bits, NaN-poisoned caches and -1 slots included. The norms: float64 within
their roundings, and the reference within two ulps, a float32 weight on a half-precision input too.
linear (oneDNN on a reordered weight): within float32 rounding of float64, a row's result independent
of the batch, a weight written in place used as written.
"""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from paged_util import CPU_CASES, dense_float64, make_batch
from fused_util import NORM_TOL, bits, rope_inputs
from tinyinfer import ops
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.extensions import host_cxx
from tinyinfer.ops import cpu_matmul, reference

HAVE_CXX = shutil.which(host_cxx()) is not None
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(params=["cpp", "pytorch"])
def path(request, monkeypatch):
    """Each CPU path of the ops: the C++ library (it must build where there is a compiler), or the
    pure-PyTorch one the ops fall back to."""
    if request.param == "cpp":
        if cpu_kernels.library() is None:
            if HAVE_CXX:
                pytest.fail(f"the CPU kernels did not build: {cpu_kernels._load()[1]}")
            pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    else:
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_paged_attention_matches_float64(path, name, dtype):
    seq_lens, q_lens, hq, hkv, d, dv, bs, mla = CPU_CASES[name]
    batch = make_batch(seq_lens, q_lens, hq, hkv, d, dv, bs, dtype, mla=mla, seed=len(name))
    got = ops.paged_attention(*batch.args())
    assert got.dtype == dtype and not got.isnan().any(), "an unused (NaN) cache slot was read"
    torch.testing.assert_close(got.double(), dense_float64(batch), **TOL[dtype])
    padding = got[int(batch.query_start_loc[-1]):]
    assert len(padding) and torch.equal(padding, torch.zeros_like(padding)), "padding rows stay zero"


@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("q_len", [1, 3])
def test_paged_attention_at_block_multiples_and_one_past_matches_float64(path, bs, q_len):
    # Lengths that end exactly on a block boundary (the last block full) and one past it (a block of
    # one key), each beside the other so a block skipped or read from a neighbour changes values.
    seq_lens = [n for k in (1, 2, 3) for n in (k * bs, k * bs + 1)] + [bs - 1]
    batch = make_batch(seq_lens, [q_len] * len(seq_lens), 4, 2, 16, 16, bs, torch.float32,
                       seed=bs + q_len)
    got = ops.paged_attention(*batch.args())
    assert not got.isnan().any(), "an unused (NaN) cache slot was read"
    torch.testing.assert_close(got.double(), dense_float64(batch), atol=2e-5, rtol=1e-5)


def test_paged_attention_with_scores_far_apart_matches_float64(path):
    # Scores spread over hundreds: most weights underflow to exactly 0 next to the largest.
    batch = make_batch([45, 130, 7], [1, 3, 1], 8, 2, 32, 32, 16, torch.float32, seed=5)
    batch.q.mul_(40.0)
    got = ops.paged_attention(*batch.args())
    torch.testing.assert_close(got.double(), dense_float64(batch), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rope_store_kv_gives_the_reference_bits(path, dtype):
    args = rope_inputs(29, 6, 2, 64, 8, dtype, "cpu", seed=11, num_blocks=8)
    want_k_cache, want_v_cache = args[5].clone(), args[6].clone()
    want_q, want_k = reference.rope_store_kv(*args[:5], want_k_cache, want_v_cache, args[7])
    got_q, got_k = ops.rope_store_kv(*args)
    for got, want in ((got_q, want_q), (got_k, want_k), (args[5], want_k_cache), (args[6], want_v_cache)):
        assert torch.equal(bits(got), bits(want))                    # NaN slots: untouched bits


def _norm_float64(stream, weight, eps):
    s = stream.double()
    return weight.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_norms_match_float64_and_the_reference(path, dtype, rows):
    # The C++ loop sums the squares in another order than ATen: y within two roundings to the dtype
    # (the normalised value, then times the weight) plus float32's sum of 576 squares of float64, and
    # within two ulps of the reference; the stream x + residual is one rounding: the reference's bits.
    # Widths 576 (SmolLM2) and 37 (no vector multiple); a float32 weight on a half-precision input too.
    gen = torch.Generator().manual_seed(7 + rows)
    for d in (576, 37):
        x = (3 * torch.randn(rows, d, generator=gen)).to(dtype)
        residual = torch.randn(rows, d, generator=gen).to(dtype)
        for weight in ((1 + 0.1 * torch.randn(d, generator=gen)).to(dtype), torch.randn(d, generator=gen)):
            u = torch.finfo(dtype).eps / 2 if weight.dtype == dtype else torch.finfo(dtype).eps / 4
            for eps, stream, (y, new_stream) in (
                    (1e-5, x, (ops.rms_norm(x, weight, 1e-5), None)),
                    (1e-6, (x + residual), ops.fused_add_rmsnorm(x, residual, weight, 1e-6))):
                want = _norm_float64(stream, weight, eps)
                assert y.dtype == torch.promote_types(dtype, weight.dtype)
                assert ((y.double() - want).abs() <= want.abs() * (4 * u + 3e-5) + 1e-30).all()
                ref = reference.rms_norm(stream, weight, eps)
                torch.testing.assert_close(y, ref, **NORM_TOL[dtype])
                if new_stream is not None:
                    assert torch.equal(bits(new_stream), bits(stream))


def test_store_kv_gives_the_reference_bits_with_and_without_v(path):
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(10, 2, 16, generator=gen), torch.randn(10, 2, 8, generator=gen)
    slots = torch.tensor([5, -1, 0, 63, 17, -1, 40, 2, 33, 9])
    for values in (v, None):
        caches = [torch.full((4, 16, 2, 16), float("nan")), torch.full((4, 16, 2, 8), float("nan"))]
        want = [c.clone() for c in caches]
        reference.store_kv(k, values, want[0], want[1] if values is not None else None, slots)
        ops.store_kv(k, values, caches[0], caches[1] if values is not None else None, slots)
        assert all(torch.equal(bits(g), bits(w)) for g, w in zip(caches, want))


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: the CPU kernels cannot be built here")
def test_portable_build_without_avx512_matches_too():
    # The loops a CPU without AVX-512 runs: built with the portable flags, under another name.
    flags = cpu_kernels.PORTABLE_FLAGS + ["-mno-avx512f"]
    cpu_kernels.compile_library(flags, name="tinyinfer_cpu_portable")
    lib = torch.ops.tinyinfer_cpu_portable
    for name in ("decode_gqa", "verify_q16_mha", "mla_latent_view"):
        seq_lens, q_lens, hq, hkv, d, dv, bs, mla = CPU_CASES[name]
        batch = make_batch(seq_lens, q_lens, hq, hkv, d, dv, bs, torch.float32, mla=mla, seed=2)
        torch.testing.assert_close(lib.paged_attention(*batch.args()).double(), dense_float64(batch),
                                   atol=2e-5, rtol=1e-5)
    args = rope_inputs(13, 4, 2, 32, 8, torch.bfloat16, "cpu", seed=4)
    want = reference.rope_store_kv(*args[:5], args[5].clone(), args[6].clone(), args[7])
    got = lib.rope_store_kv(*args)
    assert all(torch.equal(bits(g), bits(w)) for g, w in zip(got, want))
    x, residual, weight = (torch.randn(5, 576, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
                           for i in range(3))
    y, stream = lib.fused_add_rmsnorm(x, residual, weight[0], 1e-6)
    assert torch.equal(bits(stream), bits(x + residual))
    torch.testing.assert_close(y, reference.rms_norm(x + residual, weight[0], 1e-6), **NORM_TOL[torch.bfloat16])


def test_the_switch_turns_the_library_off_quietly(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # asked for: no warning
        assert cpu_kernels._load.__wrapped__() == (None, f"{cpu_kernels.ENV_SWITCH}=0")


def test_without_a_compiler_the_ops_warn_once_and_keep_their_pytorch_paths(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "host_cxx", lambda: "/nonexistent/g++")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler .*pure-PyTorch"):
        library, reason = cpu_kernels._load.__wrapped__()
    assert library is None and "/nonexistent/g++" in reason


# ---------------------------------------------------------------------------------------- linear

def _linear_case(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen)
    return x.to(dtype), w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (1, 1024, 576), (5, 960, 576), (40, 96, 256)])
def test_linear_is_within_rounding_of_float64(m, n, k, dtype):
    x, w, b = _linear_case(m, n, k, dtype)
    y = ops.linear(x, w, b)
    want = x.double() @ w.double().T + b.double()
    # float32 accumulation: <= k ulps of sum |x w|; a bfloat16 result is rounded once more (2^-8).
    bound = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    if dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * want.abs()
    assert y.dtype == dtype and bool(((y.double() - want).abs() <= bound).all())
    wrong = x.double() @ w.double().flip(0).T + b.double()          # outputs in the wrong order
    assert not bool(((wrong - want).abs() <= bound).all()), "the bound must be able to fail"


def test_linear_row_does_not_depend_on_the_batch():
    x, w, b = _linear_case(16, 1024, 576, torch.float32, seed=1)
    assert w.numel() >= cpu_matmul.SMALL_GEMV                  # one row takes oneDNN too
    batched = ops.linear(x, w, b)
    for row in (0, 7, 15):
        assert torch.equal(ops.linear(x[row:row + 1], w, b)[0], batched[row])


def test_linear_one_row_on_a_small_weight_is_torchs_matmul_of_the_transposed_weight():
    x, w, b = _linear_case(1, 64, 32, torch.float32, seed=2)
    assert torch.equal(ops.linear(x, w, b), torch.addmm(b, x, w.t().contiguous()))
    assert torch.equal(ops.linear(x[None], w, None), (x @ w.t().contiguous())[None])   # (1, 1, K)


def test_linear_weight_changed_in_place_is_used_as_written():
    x, w, _ = _linear_case(8, 512, 576, torch.float32, seed=3)
    before = ops.linear(x, w, None)
    w.mul_(-2.0)
    torch.testing.assert_close(ops.linear(x, w, None), -2.0 * before, rtol=1e-5, atol=1e-4)


def test_slots_and_blocks_outside_the_cache_are_refused(path):
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    k_cache, v_cache = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
    with pytest.raises((RuntimeError, IndexError)):
        ops.store_kv(k, v, k_cache, v_cache, torch.tensor([3, 64]))                  # 64 slots
    q = torch.randn(1, 4, 16)
    tables = torch.tensor([[0, 9]], dtype=torch.int32)                              # block 9 of 4
    with pytest.raises((RuntimeError, IndexError)):
        ops.paged_attention(q, k_cache, v_cache, tables, torch.tensor([20], dtype=torch.int32),
                            torch.tensor([0, 1], dtype=torch.int32), 0.25)


def test_a_first_build_is_announced_with_its_time(tmp_path, monkeypatch, capsys):
    """The one-time build is said on stderr (once per machine), not passed off as the model's time;
    a build found by its stamp is silent. (The compiler is stubbed: the message is what is tested.)"""
    import torch.utils.cpp_extension as cpp_extension

    def fake_load(name, build_directory, **kw):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / f"{name}.so").write_bytes(b"")
    monkeypatch.setattr(cpu_kernels, "BUILD_ROOT", tmp_path / "out")
    monkeypatch.setattr(cpu_kernels, "build_directory", lambda flags=None: tmp_path / "out")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    cpu_kernels.compile_library(name="tinyinfer_cpu_announce")
    err = capsys.readouterr().err
    assert "building the C++ CPU kernels for this CPU (once per machine" in err
    assert "C++ CPU kernels built in" in err
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    cpu_kernels.compile_library(name="tinyinfer_cpu_announce")                 # the stamp matches
    assert capsys.readouterr().err == ""
