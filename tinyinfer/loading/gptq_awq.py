"""GPTQ / AWQ checkpoints (Frantar et al., "GPTQ", ICLR 2023; Lin et al., "AWQ", MLSys 2024) imported
into tinyinfer's INT4 layers: the packed tensors of a Hugging Face directory whose config.json has a
`quantization_config`, 4 bits only, unpacked to the canonical levels of ops/int4_format.py.

GPTQ / AWQ (Hugging Face directories whose config.json has `quantization_config`), 4 bits only:
  GPTQ (AutoGPTQ):  qweight int32 (K/8, N) packed along K, nibble j of word i = k 8i + j;
                    qzeros int32 (K/G, N/8) packed along N; scales fp16 (K/G, N); g_idx int32 (K)
                    = group of input channel k. "gptq" (v1) checkpoints store z - 1, "gptq_v2" z.
                    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]
  AWQ (GEMM):       qweight int32 (K, N/8) and qzeros (K/G, N/8) packed along N with nibble i holding
                    column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; scales fp16 (K/G, N).
                    W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]
Both are repacked into our format exactly (the scales keep fp16). Act-order (g_idx not k // G) becomes
`perm`: Int4Linear gathers x[:, perm] so that each group is a contiguous run of K. Projections that
we fuse (q / k / v, gate / up) are fused when their permutations agree, else kept as separate
Int4Linears, each with its own (layers/linear.py ConcatLinear).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from tinyinfer.config.errors import CheckpointError
from tinyinfer.layers.linear import ConcatLinear, Int4Linear
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.quant.io import replace_module

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # nibble i of an AWQ word holds column 8c + _AWQ_ORDER[i]


def _nibbles(packed: Tensor) -> Tensor:
    """int32 (R, C) -> (R, C, 8) nibbles, nibble i = bits 4i..4i+3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def unpack_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor],
                v1: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """AutoGPTQ tensors -> canonical q (N, K), scales (N, K/G), zeros (N, K/G) in the permuted column
    order, and perm (K) or None when the groups are already contiguous runs of K."""
    k = qweight.shape[0] * 8
    q = _nibbles(qweight).permute(0, 2, 1).reshape(k, -1).T               # (N, K)
    z = _nibbles(qzeros).reshape(qzeros.shape[0], -1)                      # (ng, N)
    if v1:
        z = z + 1                     # v1 stores z - 1 (so z = 0 was written as 15 and reads as 16)
    z, s = z.T.contiguous(), scales.T.contiguous()                         # (N, ng)
    ng = s.shape[1]
    group_size = k // ng
    if g_idx is None or torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // group_size):
        return q.contiguous(), s, z, None
    perm = torch.argsort(g_idx.long(), stable=True)
    counts = torch.bincount(g_idx.long(), minlength=ng)
    if counts.numel() != ng or not bool((counts == group_size).all()):
        bad = int((counts != group_size).nonzero()[0])
        raise ValueError(f"act-order g_idx puts {int(counts[bad])} channels in group {bad}, not the "
                         f"group size {group_size}; this GPTQ checkpoint cannot be repacked")
    return q[:, perm].contiguous(), s, z, perm


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AWQ GEMM tensors -> canonical q (N, K), scales (N, K/G), zeros (N, K/G)."""
    inverse = [_AWQ_ORDER.index(c) for c in range(8)]     # column 8c + j sits in nibble inverse[j]

    def columns(packed: Tensor) -> Tensor:                # (R, N/8) -> (R, N)
        return _nibbles(packed)[..., inverse].reshape(packed.shape[0], -1)

    return columns(qweight).T.contiguous(), scales.T.contiguous(), columns(qzeros).T.contiguous()


def _quant_config(hf_config: dict) -> dict:
    qc = hf_config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq") or int(qc.get("bits", 0)) != 4:
        raise CheckpointError(f"quantization_config {qc} is not supported: tinyinfer reads 4-bit "
                              "GPTQ and AWQ (GEMM) checkpoints")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"AWQ version {qc.get('version')!r} is not supported; use a GEMM-packed "
                              "AWQ checkpoint")
    return qc


def _fusable(parts: list[tuple]) -> bool:
    """Unpacked parts (q, scales, zeros, perm) can share one weight: the same group count and no
    permutation, or the same one."""
    perms = [p[3] for p in parts]
    return (len({p[1].shape[1] for p in parts}) == 1
            and all((a is None) == (b is None) and (a is None or torch.equal(a, b))
                    for a, b in zip(perms, perms[1:])))


def _int4(q: Tensor, s: Tensor, z: Tensor, perm: Optional[Tensor], dtype: torch.dtype,
          device: torch.device, bias: Optional[Tensor] = None) -> Int4Linear:
    """Canonical levels (N, K) -> an Int4Linear on `device` (its group size: K / scale columns)."""
    return Int4Linear.from_quantized(q.to(device), s.to(device), z.to(device), q.shape[1] // s.shape[1],
                                     dtype, bias=bias, perm=None if perm is None else perm.to(device))


def load_gptq_awq(model: nn.Module, reader: ckpt.TensorReader, hf_config: dict, dtype: torch.dtype,
                  device: torch.device) -> list[str]:
    """Replace the linears that the checkpoint holds quantized by Int4Linear (fused q/k/v and
    gate/up concatenated along N; a ConcatLinear of one Int4Linear per part when their act-order
    permutations differ) and hide their tensors from `reader`, so checkpoint.load_weights fills the
    rest. Returns the replaced module names."""
    qc = _quant_config(hf_config)
    awq = str(qc["quant_method"]).lower() == "awq"
    v1 = not awq and str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    arch = getattr(getattr(model, "cfg", None), "architecture", None)
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        sources = [s.rsplit(".", 1)[0] for s in ckpt.hf_sources(f"{name}.weight", arch)]
        if not all(f"{s}.qweight" in reader for s in sources):
            continue
        parts = []
        for s in sources:
            qw, qz, sc = (reader.get(f"{s}.{t}") for t in ("qweight", "qzeros", "scales"))
            if awq:
                parts.append((*unpack_awq(qw, qz, sc), None))
            else:
                g_idx = reader.get(f"{s}.g_idx") if f"{s}.g_idx" in reader else None
                parts.append(unpack_gptq(qw, qz, sc, g_idx, v1))
        n, k = module.weight.shape
        if sum(p[0].shape[0] for p in parts) != n or any(p[0].shape[1] != k for p in parts):
            raise CheckpointError(f"{sources} unpack to {[tuple(p[0].shape) for p in parts]}, "
                                  f"model expects {(n, k)} for {name}")
        # A bias stays in the reader: checkpoint.load_weights fills it like any parameter.
        bias = None if module.bias is None else torch.zeros(n, dtype=dtype, device=device)
        if _fusable(parts):                       # fused: one Int4Linear over cat(parts) along N
            q, s, z = (torch.cat([p[i] for p in parts]) for i in range(3))
            layer = _int4(q, s, z, parts[0][3], dtype, device, bias)
        else:                                     # each part keeps its own act-order permutation
            layer = ConcatLinear([_int4(*p[:3], p[3], dtype, device) for p in parts], bias)
        replace_module(model, name, layer)
        for s_name in sources:
            for t in ("qweight", "qzeros", "scales", "g_idx"):
                reader.where.pop(f"{s_name}.{t}", None)
        done.append(name)
    if not done:
        raise CheckpointError("config.json has a quantization_config but the checkpoint holds no "
                              "packed .qweight tensors for this model's linears")
    return done
