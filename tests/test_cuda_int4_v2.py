"""INT4 linear v2 on a GPU (cuda/int4_mm.cuh, cuda/int4_linear.cu, binding cuda/bind_int4.h), called through
the extension directly and compared with float64 references written here:

- the tensor-core kernel for M = 1..64 in every shipped tile configuration (M 1-8, 9-16, 17-32, 33-64),
  split-K clusters (few 16-row tiles over a long K), and the dequantize + matmul path above M = 64;
- float-offset zeros (GGUF Q4_1, w = q * s + m, zeros in the scales' dtype) next to uint8 zero points
  (w = (q - z) * s), fp16 / bf16 activations, scales of either dtype;
- NaN-poisoned outputs (int4_linear_out), CUDA-graph capture + replay, clear errors.

The packing into the kernel layout is written here from the layout's definition (cuda/int4.cuh: nibble i of
word j of lane l = 4g + t in tile (nt, kb) is row 16 nt + g + 8 (i & 1), column
64 kb + 32 (j >> 1) + 8 t + 4 (j & 1) + 2 ((i >> 1) & 1) + (i >> 2); scale entry 2r + h is row r + 8h).
Error: normwise max|y - ref| / max|ref|, <= 1e-3 for fp16 and 1e-2 for bf16 activations.
"""
import pytest
import torch

pytestmark = pytest.mark.cuda

TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def pack(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g: int):
    """Canonical q (N, K) levels, s / z (N, K/G) -> (qweight (N/16, Kp/64, 32, 4) int32, scales, zeros)."""
    n, k = q.shape
    kp = -(-k // 64) * 64
    qp = torch.nn.functional.pad(q.long(), (0, kp - k))
    lane, j, i = torch.arange(32)[:, None, None], torch.arange(4)[None, :, None], torch.arange(8)[None, None, :]
    row = lane // 4 + 8 * (i & 1)                                                      # (32, 1, 8)
    col = 32 * (j >> 1) + 8 * (lane % 4) + 4 * (j & 1) + 2 * ((i >> 1) & 1) + (i >> 2)  # (32, 4, 8)
    nt, kb = n // 16, kp // 64
    rows = (torch.arange(nt)[:, None, None, None, None] * 16 + row).expand(nt, kb, 32, 4, 8)
    cols = (torch.arange(kb)[None, :, None, None, None] * 64 + col).expand(nt, kb, 32, 4, 8)
    nib = qp.to(q.device)[rows.to(q.device), cols.to(q.device)]
    words = (nib << (4 * torch.arange(8, device=q.device))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    ng = kp // g

    def pairs(t: torch.Tensor) -> torch.Tensor:  # (N, K/G) -> (N/16, Kp/G, 16), entry 2r + h = row r + 8h
        t = torch.nn.functional.pad(t, (0, ng - t.shape[1]))
        return t.reshape(nt, 2, 8, ng).permute(0, 3, 2, 1).reshape(nt, ng, 16).contiguous()

    return words.contiguous(), pairs(s), pairs(z)


def make(m, n, k, g, dtype, sdtype, float_zeros, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).to(sdtype)
    if float_zeros:
        z = (-(8 + torch.rand(n, k // g, generator=gen)) * s.float()).to(sdtype)
    else:
        z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = q.double().view(n, k // g, g)
    sd, zd = s.double()[..., None], z.double()[..., None]
    w = (w * sd + zd if float_zeros else (w - zd) * sd).view(n, k)
    ref = x.double() @ w.T                                                            # float64 reference
    qw, sk, zk = pack(q.cuda(), s.cuda(), z.cuda(), g)
    return x.cuda(), qw, sk, zk, ref


def check(ext, m, n, k, g, dtype, sdtype=torch.float16, float_zeros=False, seed=0):
    x, qw, sk, zk, ref = make(m, n, k, g, dtype, sdtype, float_zeros, seed + 31 * m + n + k + g)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ext.int4_linear_out(x, qw, sk, zk, g, out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "kernel left elements unwritten"
    err = ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[dtype], f"normwise error {err:.2e} (M={m} N={n} K={k} g={g} {dtype} float_zeros={float_zeros})"


@pytest.mark.parametrize("float_zeros", [False, True], ids=["uint8_zeros", "float_offsets"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 24, 32, 33, 48, 64, 65, 100])
@pytest.mark.parametrize("n,k,g", [(48, 160, 32), (80, 384, 64), (208, 1152, 128)])
def test_int4_linear_small_odd_shapes(cuda_extension, m, n, k, g, dtype, float_zeros):
    check(cuda_extension, m, n, k, g, dtype, float_zeros=float_zeros)


@pytest.mark.parametrize("m", [1, 16, 32, 64])
@pytest.mark.parametrize("n,k", [(48, 8192), (32, 16384)])
def test_int4_linear_split_k_clusters(cuda_extension, m, n, k):
    # 2-3 CTAs over N and hundreds of stages over K: the launcher splits K over clusters of up to 8 CTAs.
    check(cuda_extension, m, n, k, 128, torch.bfloat16, float_zeros=m % 32 == 0)


@pytest.mark.parametrize("m", [1, 16, 32, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_int4_linear_llama_shapes(cuda_extension, m, n, k):
    check(cuda_extension, m, n, k, 128, torch.bfloat16, float_zeros=m == 32)


@pytest.mark.parametrize("float_zeros", [False, True])
def test_int4_linear_scales_of_the_other_dtype(cuda_extension, float_zeros):
    for m in (4, 12, 40):
        check(cuda_extension, m, 256, 512, 64, torch.float16, sdtype=torch.bfloat16, float_zeros=float_zeros)
        check(cuda_extension, m, 256, 512, 64, torch.bfloat16, sdtype=torch.float16, float_zeros=float_zeros)


@pytest.mark.sanitizer
def test_int4_linear_every_path_small(cuda_extension):
    # M 3 / 11 / 20 / 40 / 70: the four tile configurations and dequantize + matmul; K padded (g32).
    for m in (3, 11, 20, 40, 70):
        check(cuda_extension, m, 48, 96, 32, torch.float16, float_zeros=m % 2 == 0)


def test_int4_linear_replays_in_a_cuda_graph(cuda_extension):
    for m, n, k in [(2, 256, 512), (16, 48, 8192), (40, 256, 512)]:  # plain, split-K clusters, GEMM
        x, qw, sk, zk, _ = make(m, n, k, 128, torch.float16, torch.float16, True, seed=5)
        cuda_extension.int4_linear(x, qw, sk, zk, 128)                 # load outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = cuda_extension.int4_linear(x, qw, sk, zk, 128)
        x2, _, _, _, _ = make(m, n, k, 128, torch.float16, torch.float16, True, seed=6)
        x.copy_(x2)
        graph.replay()
        want = cuda_extension.int4_linear(x, qw, sk, zk, 128)           # eager launch on the new x
        torch.cuda.synchronize()
        assert torch.equal(y, want), f"graph replay differs from an eager call (M={m} N={n} K={k})"


def test_int4_linear_zeros_dtype_and_alignment_errors_are_clear(cuda_extension):
    x, qw, sk, zk, _ = make(1, 64, 256, 128, torch.float16, torch.float16, False, seed=9)
    with pytest.raises(RuntimeError, match="zeros must have the scales' shape"):
        cuda_extension.int4_linear(x, qw, sk, zk.float(), 128)
    with pytest.raises(RuntimeError, match="zeros must have the scales' shape"):
        cuda_extension.int4_linear(x, qw, sk, sk.bfloat16(), 128)   # offsets in another dtype than the scales
    shifted = torch.empty(zk.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(zk.shape)
    shifted.copy_(zk)                                               # contiguous, one byte off alignment
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        cuda_extension.int4_linear(x, qw, sk, shifted, 128)
