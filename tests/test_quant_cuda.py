"""INT4 CUDA kernels (cuda/int4_linear.cu) against the reference op, on fresh random inputs.

The output is poisoned with NaN before each launch (int4_linear_out writes into the given tensor), so
an element the kernel never writes shows up. Error: normwise |y - ref|_inf / |ref|_inf against the
float32 reference, <= 1e-3 for fp16 and 1e-2 for bf16 activations.
"""
import pytest
import torch

from tinyinfer import ops
from tinyinfer.ops import int4_format as qformat
from tinyinfer.ops import reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def ext():
    from tinyinfer import extensions
    return extensions.require_extension()


def _random_int4(n, k, g, scale_dtype, gen):
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8).cuda()
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).to(scale_dtype).cuda()
    z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8).cuda()
    return qformat.to_kernel_layout(q, s, z, g)                           # repacked on the GPU


def _check(ext, m, n, k, g, dtype, scale_dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed + m * 7 + n + k + g)
    qw, sc, zs = _random_int4(n, k, g, scale_dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    ref = reference.int4_linear(x.float(), qw, sc, zs, g)          # float32 reference
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ext.int4_linear_out(x, qw, sc, zs, g, out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "kernel left elements unwritten"
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err <= TOL[dtype], f"normwise error {err:.2e} (M={m} N={n} K={k} g={g} {dtype})"
    # The custom op dispatches to the same kernel on CUDA tensors.
    y = ops.int4_linear(x, qw, sc, zs, g)
    assert ((y.float() - ref).abs().max() / ref.abs().max()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 17, 64])
@pytest.mark.parametrize("n,k,g", [(48, 96, 32), (80, 192, 64), (112, 384, 128), (208, 1152, 128),
                                   (3 * 16, 5 * 32, 32)])
def test_int4_kernel_matches_reference_small_odd_shapes(ext, m, n, k, g, dtype):
    _check(ext, m, n, k, g, dtype)


@pytest.mark.parametrize("m", [1, 8, 16, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_int4_kernel_matches_reference_llama_shapes(ext, m, n, k):
    _check(ext, m, n, k, 128, torch.bfloat16)


@pytest.mark.sanitizer
def test_int4_gemv_and_dequant_kernels_small(ext):
    # Both kernels (M <= 16: GEMV; M > 16: dequantize + matmul), K padded to 64 (g32), odd tile counts.
    for m in (3, 11, 20):
        _check(ext, m, 48, 96, 32, torch.float16)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_kernel_group_sizes_fp16(ext, g):
    _check(ext, 4, 1024, 2048, g, torch.float16)


def test_int4_kernel_bf16_scales_with_fp16_activations(ext):
    _check(ext, 5, 256, 512, 64, torch.float16, scale_dtype=torch.bfloat16)


def test_fp16_scales_stay_exact_under_bf16_activations(ext):
    # Integer weights (q - z) times fp16 scales: the kernel applies the fp16 scale in fp32, so a bf16
    # run equals the float32 computation up to bf16 rounding of the output only.
    _check(ext, 1, 128, 256, 128, torch.bfloat16)


@pytest.mark.parametrize("ckpt", ["models/shakespeare-llama", "models/shakespeare-draft",
                                  "models/shakespeare-mla"])
def test_every_demo_linear_shape_is_supported(ext, ckpt):
    from safetensors import safe_open
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        shapes = {tuple(f.get_slice(name).get_shape()) for name in f.keys()
                  if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")}
    for n, k in sorted(shapes):
        for m in (1, 16, 33):
            _check(ext, m, n, k, 128 if k % 128 == 0 else 64, torch.bfloat16)


def test_int4_linear_errors_are_clear(ext):
    gen = torch.Generator().manual_seed(9)
    qw, sc, zs = _random_int4(64, 256, 128, torch.float16, gen)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not a multiple of the group size"):
        ext.int4_linear(torch.randn(1, 200, device="cuda", dtype=torch.float16), qw, sc, zs, 128)
    with pytest.raises(RuntimeError, match="group_size must be 32, 64 or 128"):
        ext.int4_linear(x, qw, sc, zs, 16)
    with pytest.raises(RuntimeError, match="scales must be"):
        ext.int4_linear(x, qw, sc[:, :1].contiguous(), zs, 128)


def test_int4_linear_captures_in_a_cuda_graph(ext):
    gen = torch.Generator().manual_seed(10)
    qw, sc, zs = _random_int4(256, 512, 128, torch.float16, gen)
    x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    ops.int4_linear(x, qw, sc, zs, 128)                   # warm-up (and JIT build) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.int4_linear(x, qw, sc, zs, 128)
    x.copy_(torch.randn(2, 512, device="cuda", dtype=torch.float16))
    graph.replay()
    ref = reference.int4_linear(x.float(), qw, sc, zs, 128)
    assert (y.float() - ref).abs().max() / ref.abs().max() <= 1e-3
