"""The CPU kernel of ops.int4_linear (ops/cpu_matmul.py) against the op's reference and float64: bfloat16
activations run the C++ INT4 kernel (tests/test_int4_vnni.py holds it to its own, tighter bound) or,
without the C++ library, PyTorch's CPU INT4 matmul (aten._weight_int4pack_mm_for_cpu), both within the
documented bfloat16 bound of the latter, for both zero conventions (integer zero point; GGUF Q4_1's float offset); float32 /
float16 activations give the reference's values bit for bit; a changed weight is never served stale."""
import pytest
import torch

from tinyinfer import ops
from tinyinfer.ops import reference
from tinyinfer.ops import int4_format as qformat

SHAPES = [(16, 64, 32), (48, 96, 32), (960, 576, 32), (64, 256, 64), (32, 384, 128)]


def _weights(n, k, g, float_zeros, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.001).half()   # fp16: not bf16-exact
    if float_zeros:
        z = (-(torch.rand(n, k // g, generator=gen) * 0.4)).half()     # Q4_1: w = q * s + m
    else:
        z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return q, s, z


@pytest.mark.parametrize("float_zeros", [False, True], ids=["zero_point", "float_offset"])
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_bfloat16_within_the_documented_bound_of_float64(m, n, k, g, float_zeros):
    q, s, z = _weights(n, k, g, float_zeros)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = ops.int4_linear(x, *qformat.to_kernel_layout(q, s, z, g), g)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    w64 = qformat.dequantize(q, s, z, g).double()                      # the exact weights
    ref = x.double() @ w64.T
    s64 = s.double().repeat_interleave(g, 1)
    zero = ((8 * s.double() + z.double()) if float_zeros
            else (8 - z.double()) * s.double()).repeat_interleave(g, 1)
    # |y - ref| <= 2^-8 * sum_k |x_k| (3 |(q_k - 8) s| + 25 s + 3 |zero|) + 2^-8 |ref| (ops/cpu_matmul.py)
    weight_scale = 3 * (q.double() - 8).abs() * s64 + 25 * s64 + 3 * zero.abs()
    bound = 2 ** -8 * (x.double().abs() @ weight_scale.T + ref.abs())
    assert bool(((y.double() - ref).abs() <= bound).all())
    # and not vacuous: a kernel that got the zero's sign wrong would break it
    wrong = x.double() @ ((q.double() - 8) * s64 - zero).T
    assert bool(((wrong - ref).abs() > bound).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("float_zeros", [False, True], ids=["zero_point", "float_offset"])
def test_other_dtypes_give_the_reference_bit_for_bit(dtype, float_zeros):
    n, k, g = 48, 96, 32
    packed = qformat.to_kernel_layout(*_weights(n, k, g, float_zeros), g)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    for _ in range(2):                                   # the second call uses the cached weight
        assert torch.equal(ops.int4_linear(x, *packed, g), reference.int4_linear(x, *packed, g))


def test_a_weight_changed_in_place_is_converted_again():
    n, k, g = 32, 128, 64
    qweight, scales, zeros = qformat.to_kernel_layout(*_weights(n, k, g, False), g)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.bfloat16, torch.float32):
        before = ops.int4_linear(x.to(dtype), qweight, scales, zeros, g)
        qweight.bitwise_xor_(0x11111111)                 # every nibble changes
        after = ops.int4_linear(x.to(dtype), qweight, scales, zeros, g)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after.float(), reference.int4_linear(x, qweight, scales, zeros, g),
                                   rtol=0.02, atol=0.02 * float(after.float().abs().max()))


def test_empty_batch():
    n, k, g = 16, 64, 32
    packed = qformat.to_kernel_layout(*_weights(n, k, g, False), g)
    for dtype in (torch.bfloat16, torch.float32):
        assert ops.int4_linear(torch.zeros(0, k, dtype=dtype), *packed, g).shape == (0, n)


@pytest.mark.parametrize("float_zeros", [False, True], ids=["zero_point", "float_offset"])
def test_bf16_scale_and_zero_fit_each_group_no_worse_than_rounding(float_zeros):
    """bf16_scale_zero's pair: per group, the squared error of the weights (in float64) is at most that
    of rounding scale and zero to the nearest bf16, and less over the whole matrix; each value within
    1.5 bf16 steps (2^-7 relative each) of its target."""
    from tinyinfer.ops.cpu_matmul import bf16_scale_zero
    n, k, g = 64, 256, 32
    q, s, z = _weights(n, k, g, float_zeros, seed=3)
    s32 = s.float()
    zero = 8 * s32 + z.float() if float_zeros else (8 - z.float()) * s32
    a, b = bf16_scale_zero(q, s32, zero)
    assert torch.equal(a, a.bfloat16().float()) and torch.equal(b, b.bfloat16().float())

    def group_sse(scale, offset):
        w = (q.double() - 8).view(n, -1, g) * scale.double()[..., None] + offset.double()[..., None]
        exact = (q.double() - 8).view(n, -1, g) * s32.double()[..., None] + zero.double()[..., None]
        return ((w - exact) ** 2).sum(-1)                                    # (n, k / g)
    fitted, rounded = group_sse(a, b), group_sse(s32.bfloat16().float(), zero.bfloat16().float())
    assert bool((fitted <= rounded * (1 + 1e-9)).all())
    assert fitted.sum() < rounded.sum()
    assert bool(((a - s32).abs() <= 1.5 * 2 ** -7 * s32.abs()).all())
