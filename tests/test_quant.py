"""INT4 format and quantizer (tinyinfer/ops/int4_format.py, quantizer.py): packing, layouts, error bounds, the reference op."""
import pytest
import torch
from torch import nn

from tinyinfer import ops
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.ops import int4_format as qformat
from tinyinfer.quant import quantizer


def _levels(n, k, gen):
    return torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)


def _group_params(n, k, g, gen, scale_dtype=torch.float16):
    s = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return s, z


def test_pack_unpack_nibbles_exact():
    gen = torch.Generator().manual_seed(0)
    q = _levels(32, 256, gen)
    packed = qformat.pack_nibbles(q)
    assert packed.shape == (32, 128) and packed.dtype == torch.uint8
    # Documented order: even k in the low nibble.
    assert torch.equal(packed & 0xF, q[:, 0::2]) and torch.equal(packed >> 4, q[:, 1::2])
    assert torch.equal(qformat.unpack_nibbles(packed), q)


@pytest.mark.parametrize("n,k,g", [(16, 64, 64), (48, 96, 32), (32, 256, 128), (576, 256, 128)])
def test_kernel_layout_follows_the_index_formula(n, k, g):
    # Independent statement of cuda/int4.cuh: nibble i of word j of lane l of tile (nt, kb) holds
    # row nt*16 + l//4 + 8*(i&1), column kb*64 + 32*(j>>1) + 8*(l%4) + 4*(j&1) + 2*((i>>1)&1) + (i>>2).
    gen = torch.Generator().manual_seed(1)
    q = _levels(n, k, gen)
    s, z = _group_params(n, k, g, gen)
    words, _, _ = qformat.to_kernel_layout(q, s, z, g)
    kp = -(-k // 64) * 64
    assert words.shape == (n // 16, kp // 64, 32, 4) and words.dtype == torch.int32
    nt, kb, lane, j, i = torch.meshgrid(*(torch.arange(d) for d in (n // 16, kp // 64, 32, 4, 8)),
                                        indexing="ij")
    row = nt * 16 + lane // 4 + 8 * (i & 1)
    col = kb * 64 + 32 * (j >> 1) + 8 * (lane % 4) + 4 * (j & 1) + 2 * ((i >> 1) & 1) + (i >> 2)
    padded = torch.nn.functional.pad(q.long(), (0, kp - k))
    nib = (words.long().unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    assert torch.equal(nib, padded[row, col])


@pytest.mark.parametrize("n,k,g", [(32, 96, 32), (64, 256, 64), (32, 384, 128)])
def test_kernel_layout_round_trip_and_scale_pairs(n, k, g):
    gen = torch.Generator().manual_seed(2)
    q = _levels(n, k, gen)
    s, z = _group_params(n, k, g, gen, torch.bfloat16)
    words, sk, zk = qformat.to_kernel_layout(q, s, z, g)
    # Entry 2r + h of a tile's 16 scales is row r + 8h.
    assert torch.equal(sk[1, 0, 2 * 3 + 1], s[16 + 3 + 8, 0]) and torch.equal(zk[0, k // g - 1, 2 * 5], z[5, -1])
    q2, s2, z2 = qformat.from_kernel_layout(words, sk, zk, k)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_rtn_error_per_group_within_half_a_scale(g, scale_dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=gen) * 0.05
    w[0, :g] = 0.3                              # a constant group, and a group with one outlier
    w[1, 5] = 2.0
    q, s, z = quantizer.quantize_weight(w, g, clip_search=False, scale_dtype=scale_dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.dtype == scale_dtype
    err = (qformat.dequantize(q, s, z, g) - w.double()).abs().reshape(64, -1, g).amax(-1)
    assert bool((err <= s.double() / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("g", [32, 64, 128])
def test_clip_search_never_worse_than_rtn_in_any_group(g):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(96, 512, generator=gen) * 0.02
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8               # heavy-tailed, like real weights
    def group_err(clip, power):                   # the error the search minimizes, per group
        q, s, z = quantizer.quantize_weight(w, g, clip_search=clip, power=power)
        return (qformat.dequantize(q, s, z, g) - w).abs().pow(power).reshape(96, -1, g).sum(-1)
    for power in (2, 4):
        rtn, clip = group_err(False, power), group_err(True, power)
        assert bool((clip <= rtn).all())
        assert clip.sum() < 0.95 * rtn.sum()                         # and it actually helps


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k,g", [(48, 96, 32), (32, 256, 128)])
def test_int4_linear_reference_equals_float64(m, n, k, g):
    gen = torch.Generator().manual_seed(5)
    q = _levels(n, k, gen)
    s, z = _group_params(n, k, g, gen)
    x = torch.randn(m, k, generator=gen)
    y = ops.int4_linear(x, *qformat.to_kernel_layout(q, s, z, g), g)
    w64 = (q.double() - z.double().repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)
    torch.testing.assert_close(y.double(), x.double() @ w64.T, rtol=1e-5, atol=1e-5)


def test_int4_linear_applies_act_order_permutation_and_bias():
    gen = torch.Generator().manual_seed(6)
    n, k, g = 32, 128, 32
    q = _levels(n, k, gen)
    s, z = _group_params(n, k, g, gen)
    perm = torch.randperm(k, generator=gen)
    bias = torch.randn(n, generator=gen)
    layer = Int4Linear.from_quantized(q, s, z, g, torch.float32, bias=bias, perm=perm)
    # The kernel-order weight multiplies x[:, perm]: the dense weight puts column perm[i] at i.
    w_kernel = qformat.dequantize(q, s, z, g).double()
    w_dense = torch.zeros_like(w_kernel)
    w_dense[:, perm] = w_kernel
    x = torch.randn(2, 5, k, generator=gen)
    torch.testing.assert_close(layer(x).double(), x.double() @ w_dense.T + bias.double(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize().double(), w_dense)


def test_bad_shapes_get_clear_errors():
    lin = nn.Linear(96, 32, bias=False)
    with pytest.raises(ValueError, match="does not divide the input width K=96"):
        quantizer.quantize_linear(lin, group_size=64)
    with pytest.raises(ValueError, match="not supported"):
        quantizer.quantize_linear(lin, group_size=16)
    with pytest.raises(ValueError, match="multiple of 16, got N=40"):
        quantizer.quantize_linear(nn.Linear(128, 40), group_size=128)
    q = torch.zeros(32, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not match weight"):
        Int4Linear.from_quantized(q, torch.ones(32, 2, dtype=torch.float16),
                                        torch.zeros(32, 1, dtype=torch.uint8), 64, torch.float32)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(64, 128)
        self.proj = nn.Linear(128, 256)
        self.odd = nn.Linear(128, 40)               # N not a multiple of 16: stays dense
        self.lm_head = nn.Linear(128, 64, bias=False)


def test_quantize_model_replaces_linears_but_not_head_or_embedding():
    torch.manual_seed(7)
    model = _Tiny()
    with pytest.warns(RuntimeWarning, match="odd stays dense"):
        names = quantizer.quantize_model(model, group_size=64).names
    assert names == ["proj"]
    assert isinstance(model.proj, Int4Linear) and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.odd, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    with pytest.warns(RuntimeWarning, match="odd stays dense"):
        assert quantizer.quantize_model(_Tiny(), 64, quantize_head=True).names == ["proj", "lm_head"]


def test_linear_weight_bytes_at_g128_within_0_27_of_bf16():
    layer = Int4Linear(4096, 4096, 128, torch.bfloat16)
    int4_bytes = sum(b.numel() * b.element_size() for b in (layer.qweight, layer.scales, layer.zeros))
    assert int4_bytes / (4096 * 4096 * 2) <= 0.27
