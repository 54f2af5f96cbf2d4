"""CPU matmuls: the `cpu` kernels of ops.linear and ops.int4_linear (registered by ops/cpu.py). Each
layer's weight is converted once, at load (`convert_linear` / `convert_int4`, called by the loader on
a CPU, so that loading's temporaries are freed with the rest) or else on its first call, and cached
(again if it is written in place).

linear: float32 / bfloat16 weights reordered once into oneDNN's blocked layout, the pair of calls
PyTorch's own compiler uses for CPU linears (MKL's sgemm, torch's default, is 1.5-2x slower on this
project's AMD machine: docs/cpu-performance.md). Results: within float32 rounding of float64.

int4_linear: bfloat16 activations run the C++ library's INT4 kernel (cpu/int4_linear.h: integer dot
products on the layer's own kernel layout, no second copy; its error bound there), or where the library
cannot be built PyTorch's CPU INT4 matmul on a repacked weight (its bound at `tinygemm_weights`); float32
/ float16 activations multiply by the weight dequantized once to float32, the reference's own values,
bit for bit. Memory: each converted copy sits beside the weight.

linear_form / int4_form: which of these forms a call with `rows` rows would multiply by, as data, for
the fused decode step (cpu/decode_step.h), which makes the same ATen call from C++.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.ops.int4_format import dequantize_kernel_layout, from_kernel_layout

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
SMALL_GEMV = 1 << 19          # weights below this many elements: one row takes torch's matmul
# The overload itself: calling the packet makes torch match the arguments against every overload.
_ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default if ONEDNN else None

# weight -> (version, oneDNN / transposed weight); qweight -> (scales, zeros, qweight version, weights).
_ONEDNN: WeakIdKeyDictionary = WeakIdKeyDictionary()
_TRANSPOSED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_TINYGEMM: WeakIdKeyDictionary = WeakIdKeyDictionary()
_DEQUANTIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _converted(cache: WeakIdKeyDictionary, weight: Tensor, convert: Callable[[Tensor], Tensor]) -> Tensor:
    """convert(weight), made once per weight (again if the weight is written in place)."""
    version = -1 if weight.is_inference() else weight._version
    hit = cache.get(weight)
    if hit is not None and hit[0] == version:
        return hit[1]
    value = convert(weight.detach())
    cache[weight] = (version, value)
    return value


def _reorder(weight: Tensor) -> Tensor:
    # (N, K) -> oneDNN's blocked layout (an opaque mkldnn tensor), tuned for 16-row steps.
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _takes_transposed(weight: Tensor, rows: int) -> bool:
    # One row against a small weight (a small model's decode, its weights in cache), or any number of
    # rows of float32 against one: torch's matmul on a (K, N) row-major copy skips oneDNN's ~10-20 us
    # fixed cost (MKL reads it ~20% faster than (N, K)). Float32 on this project's Intel CPU, one
    # thread, (K, N) over oneDNN: 1.2-1.6x at 16 rows on the demo model's and SmolLM2's shapes, 1.0-1.2x
    # at 64, 0.95-1.0x at 256 (docs/cpu-performance.md): one form for every row count, so the fused
    # step's plans and the per-op path agree and a small float32 weight has no oneDNN copy.
    return weight.numel() < SMALL_GEMV and (rows == 1 or weight.dtype == torch.float32)


def linear_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # x (..., K), weight (N, K), bias (N,) -> (..., N): `_takes_transposed`, else oneDNN, on whose path
    # a row's result does not depend on the rows beside it.
    rows = x.numel() // max(1, x.shape[-1])
    if (not ONEDNN or x.dtype not in ONEDNN_DTYPES or weight.dtype != x.dtype or rows == 0
            or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    if _takes_transposed(weight, rows):
        wt = _converted(_TRANSPOSED, weight, lambda w: w.t().contiguous())          # (K, N)
        x2 = x.reshape(rows, -1)
        y = x2 @ wt if bias is None else torch.addmm(bias, x2, wt)
        return y.view(*x.shape[:-1], weight.shape[0])
    return _ONEDNN_LINEAR(x, _converted(_ONEDNN, weight, _reorder), bias, "none", [], "")


def convert_linear(weight: Tensor) -> None:
    """At load: the oneDNN form of a weight too large for the one-row path (what every call uses)."""
    if ONEDNN and weight.dtype in ONEDNN_DTYPES and weight.numel() >= SMALL_GEMV:
        _converted(_ONEDNN, weight, _reorder)


def convert_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int, dtype: torch.dtype) -> None:
    """At load: the form int4_linear_cpu multiplies by for `dtype` activations."""
    if dtype == torch.bfloat16:
        if cpu_kernels.library() is None:
            tinygemm_weights(qweight, scales, zeros, k)
    else:
        _dequantized(qweight, scales, zeros, k)


def _dequantized(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int) -> Tensor:
    return _cached(_DEQUANTIZED, qweight, scales, zeros,
                   lambda: dequantize_kernel_layout(qweight, scales, zeros, k))      # (N, K) fp32


def _cached(cache: WeakIdKeyDictionary, qweight: Tensor, scales: Tensor, zeros: Tensor,
            convert: Callable[[], Any]) -> Any:
    hit = cache.get(qweight)
    if hit is not None and hit[0] is scales and hit[1] is zeros and hit[2] == qweight._version:
        return hit[3]
    value = convert()
    cache[qweight] = (scales, zeros, qweight._version, value)
    return value


def tinygemm_weights(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The kernel-layout INT4 weight (ops/int4_format.py) in the packing of `_weight_int4pack_mm_for_cpu`
    (the CPU port of "tinygemm"; AVX-512 / AVX2 for bf16, its float32 path is scalar), cached per layer:
    -> (packed uint8 (N, K/2), scale_and_zero bf16 (K/G, N, 2)); the kernel computes w = (q - 8) *
    scale + zero in fp32. An integer zero z maps exactly to zero = (8 - z) s, a float offset m (GGUF
    Q4_1) to 8 s + m; scale and zero become the bf16 pair that fits the group's weights best
    (`bf16_scale_zero`: 8 significant bits; our scales have 11), each within 1.5 bf16 steps of its
    target, which with y rounded to bf16 bounds each output (tests/test_quant_cpu.py checks it against
    float64) by |y - y_ref| <= 2^-8 sum_k |x_k| (3 |(q_k - 8) s| + 25 s + 3 |zero|) + 2^-8 |y_ref|
    (at most ~0.2 s per weight), inside INT4's own rounding (s / 2 per weight). (No exact CPU INT4 matmul exists for float32, so loading/weights.py
    runs INT4 models in bf16 on a CPU unless a dtype is asked for.)"""
    def convert() -> tuple[Tensor, Tensor]:
        q, s, z = from_kernel_layout(qweight, scales, zeros, k)        # (N, K), (N, K/G) x 2
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        s32 = s.float()
        zero = 8 * s32 + z.float() if z.is_floating_point() else (8 - z.float()) * s32  # (N, K/G)
        scale, zero = bf16_scale_zero(q, s32, zero)
        scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1)           # (K/G, N, 2)
        return packed, scale_and_zero.to(torch.bfloat16).contiguous()
    return _cached(_TINYGEMM, qweight, scales, zeros, convert)


def _bf16_around(x: Tensor) -> list[Tensor]:
    # x float32 -> [x rounded to bf16, the bf16 value one step below it, one step above] (float32)
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16)
    return [b.float(), (bits - 1).view(torch.bfloat16).float(), (bits + 1).view(torch.bfloat16).float()]


def bf16_scale_zero(q: Tensor, s: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """q (N, K) levels; s, zero (N, K/G) float32, w = (q - 8) s + zero -> (a, b) (N, K/G), bf16 values
    (in float32) with the least squared error of the group's weights, sum_k ((q_k - 8)(s - a) + zero -
    b)^2, among: a = s rounded to bf16 or a bf16 step either side, each with b = zero plus the group's
    mean of a's error, rounded or a step either side; and both rounded to the nearest (so no group is
    worse than plain rounding). Rounding the scale alone errs by the same sign for a whole group
    of 32 weights: an error the zero can take up for free (docs/quality.md: the near-ties it moved)."""
    n, k = q.shape
    g = k // s.shape[1]
    qg = q.reshape(n, -1, g)                                              # (N, K/G, G) uint8
    sq = qg.sum(-1, dtype=torch.int32).float()                            # sums in integers: exact
    sq2 = (qg * qg).sum(-1, dtype=torch.int32).float()                    # 15^2 fits a uint8
    s1, s2 = sq - 8 * g, sq2 - 16 * sq + 64 * g                           # sum (q-8), sum (q-8)^2
    best = torch.full_like(s, float("inf"))
    best_a, best_b = s, zero
    # plain rounding last: on a tie the zero that carries the scale's error is kept
    candidates = [(a, b) for a in _bf16_around(s) for b in _bf16_around(zero + (s - a) * s1 / g)]
    for a, b in candidates + [(s.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float())]:
        ds, dz = s - a, zero - b
        err = ds * ds * s2 + 2 * ds * dz * s1 + g * dz * dz                       # (N, K/G)
        keep = err < best                 # False for a NaN (a step below 0's bits): never picked
        best = torch.where(keep, err, best)
        best_a, best_b = torch.where(keep, a, best_a), torch.where(keep, b, best_b)
    return best_a, best_b


def int4_linear_cpu(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                    group_size: int) -> Tensor:
    # x (M, K) -> y (M, N) = x @ W.T; bf16: the CPU INT4 kernel, else the cached float32 weight.
    m, k = x.shape
    if x.dtype != torch.bfloat16:
        w = _dequantized(qweight, scales, zeros, k)                                   # (N, K) fp32
        return (x.float() @ w.T).to(x.dtype)
    lib = cpu_kernels.library()
    if lib is not None:
        return lib.int4_linear.default(x, qweight, scales, zeros, group_size)          # (M, N) bf16
    packed, scale_and_zero = tinygemm_weights(qweight, scales, zeros, k)
    if m == 0:
        return x.new_empty(0, packed.shape[0])
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size,
                                                     scale_and_zero)                  # (M, N) bf16


# The forms of cpu/decode_step.h (LinearKind): (kind, a, b, group size); INT4 takes the zeros too.
INT4_PACK, ONEDNN_FORM, TRANSPOSED, DEQUANTIZED, DENSE, INT4 = range(6)


def linear_form(weight: Tensor, dtype: torch.dtype, rows: int) -> tuple[int, Tensor, Tensor, int]:
    """What linear_cpu (no bias) multiplies `rows` rows of `dtype` by, made now if not made yet."""
    if not ONEDNN or dtype not in ONEDNN_DTYPES or weight.dtype != dtype or rows == 0:
        return DENSE, weight, weight, 0
    if _takes_transposed(weight, rows):
        wt = _converted(_TRANSPOSED, weight, lambda w: w.t().contiguous())
        return TRANSPOSED, wt, wt, 0
    w = _converted(_ONEDNN, weight, _reorder)
    return ONEDNN_FORM, w, w, 0


def int4_form(qweight: Tensor, scales: Tensor, zeros: Tensor, k: int, group_size: int,
              dtype: torch.dtype) -> tuple[int, Tensor, Tensor, int]:
    """What int4_linear_cpu multiplies `dtype` activations by."""
    if dtype != torch.bfloat16:
        w = _dequantized(qweight, scales, zeros, k)
        return DEQUANTIZED, w, w, 0
    if cpu_kernels.library() is not None:
        return INT4, qweight, scales, group_size
    packed, scale_and_zero = tinygemm_weights(qweight, scales, zeros, k)
    return INT4_PACK, packed, scale_and_zero, group_size
