"""The C++ CPU INT4 matmul (cpu/int4_linear.h) against float64 on the dequantized weights: every zero
convention (integer zero point, GGUF Q4_1's float offset, symmetric Q4_0), every group size, scales in
float16 / bfloat16 / float32, 1 to 200 rows, K padded inside a tile; within the bound of its
activation quantization (int16 per group: half a step, a / 2 = max|x_g| / 65534, per weight) for one
row, of float32 rounding alone from kInt4DequantizeRows rows on (the weights dequantized exactly);
plus the output's own rounding. No NaN or infinity that the input has not; the same bits at 1 and 2
threads and for a row among few or many others; the portable build (no AVX-512: the integer path for
every row) within the integer path's bound."""
import pytest
import torch

from tinyinfer import ops
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.ops import int4_format as qformat

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the C++ CPU library is not built")
DEQUANTIZE_ROWS = 2                                    # cpu/int4_linear.h: kInt4DequantizeRows
OUTPUT_ULP = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10, torch.float32: 2 ** -23}


def _weights(n, k, g, zeros, scale_dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.001).to(scale_dtype)
    if zeros == "offset":                                    # Q4_1: w = q s + m
        z = (-(torch.rand(n, k // g, generator=gen) * 0.4)).to(scale_dtype)
    elif zeros == "symmetric":                               # Q4_0: w = (q - 8) s
        z = torch.full((n, k // g), 8, dtype=torch.uint8)
    else:
        z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return q, s, z


def _bound(x, w64, g, dequantized):
    """|y - x W^T| allowed: the activations' or the weights' rounding, float32 sums, the output's."""
    m, k = x.shape
    xa = x.double().abs()
    if dequantized:
        inputs = 0
    else:
        half_step = xa.view(m, k // g, g).amax(-1).repeat_interleave(g, 1) / 65534
        inputs = half_step @ w64.abs().T
    sums = k * 2 ** -24 * (xa @ w64.abs().T)              # float32 sums of k terms (Higham's gamma_k)
    return 1.01 * inputs + sums + OUTPUT_ULP[x.dtype] * (x.double() @ w64.T).abs()


def _check(lib, m, n, k, g, zeros, dtype=torch.bfloat16, scale_dtype=torch.float16, native=True):
    q, s, z = _weights(n, k, g, zeros, scale_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed = qformat.to_kernel_layout(q, s, z, g)
    y = lib.int4_linear(x, *packed, g)
    assert y.dtype == dtype and y.shape == (m, n) and bool(y.isfinite().all())
    w64 = qformat.dequantize(q, s, z, g).double()
    err = (y.double() - x.double() @ w64.T).abs()
    bound = _bound(x, w64, g, native and dtype == torch.bfloat16 and m >= DEQUANTIZE_ROWS)
    assert bool((err <= bound).all()), float((err / bound).max())
    return x, packed, q, s, z, bound


@pytest.mark.parametrize("zeros", ["zero_point", "offset", "symmetric"])
@pytest.mark.parametrize("n,k,g", [(48, 96, 32), (32, 320, 64), (16, 384, 128), (576, 576, 32)])
@pytest.mark.parametrize("m", [1, 3, 16, 200])
def test_int4_matmul_is_within_its_bound_of_float64(m, n, k, g, zeros):
    x, packed, q, s, z, bound = _check(torch.ops.tinyinfer_cpu, m, n, k, g, zeros)
    # and not vacuous: a zero point off by one breaks it
    w_wrong = qformat.dequantize(q, s, z + (0.02 if zeros == "offset" else 1), g).double()
    y = torch.ops.tinyinfer_cpu.int4_linear(x, *packed, g).double()
    assert bool(((x.double() @ w_wrong.T - y).abs() > bound).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_other_activation_and_scale_dtypes(dtype, scale_dtype):
    for m in (1, 16):
        _check(torch.ops.tinyinfer_cpu, m, 48, 192, 64, "offset", dtype, scale_dtype)
    _check(torch.ops.tinyinfer_cpu, 16, 48, 192, 32, "zero_point", torch.bfloat16, scale_dtype)


def test_the_cpu_op_runs_it_and_rows_alone_threads_and_nonfinite_inputs():
    n, k, g = 96, 192, 32
    packed = qformat.to_kernel_layout(*_weights(n, k, g, "offset"), g)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = torch.ops.tinyinfer_cpu.int4_linear(x, *packed, g)
    assert torch.equal(ops.int4_linear(x, *packed, g), y)                     # ops/cpu_matmul.py
    assert torch.equal(torch.cat([torch.ops.tinyinfer_cpu.int4_linear(x[i:i + 2], *packed, g)
                                  for i in range(0, 6, 2)]), y)
    threads = torch.get_num_threads()
    try:
        for rows in (x[:1], x):                                                 # both paths
            torch.set_num_threads(1)
            one = torch.ops.tinyinfer_cpu.int4_linear(rows, *packed, g)
            torch.set_num_threads(2)
            assert torch.equal(torch.ops.tinyinfer_cpu.int4_linear(rows, *packed, g), one)
    finally:
        torch.set_num_threads(threads)
    for rows in (x[:1], x[1:2], x[2:3], x):
        big = rows.clone()
        big[0] *= 1e30                                       # large but finite: nothing overflows here
        if len(big) > 1:
            big[1, 5] = float("nan")
            big[2, 7] = float("inf")
        out = torch.ops.tinyinfer_cpu.int4_linear(big, *packed, g)
        assert bool(out[0].isfinite().all()) and bool(out[3:].isfinite().all())
        assert not bool(out[1:3].isfinite().any())           # a NaN / inf row stays non-finite
    for bad in (float("nan"), float("inf")):                 # one row alone: the integer path
        row = x[:1].clone()
        row[0, 9] = bad
        assert not bool(torch.ops.tinyinfer_cpu.int4_linear(row, *packed, g).isfinite().any())


def test_portable_build_without_avx512_is_within_the_bound_too():
    cpu_kernels.compile_library(cpu_kernels.PORTABLE_FLAGS + ["-mno-avx512f"], name="tinyinfer_cpu_portable")
    lib = torch.ops.tinyinfer_cpu_portable
    for zeros in ("zero_point", "offset"):
        for m, g in ((1, 32), (16, 64)):
            _check(lib, m, 48, 192, g, zeros, native=False)
