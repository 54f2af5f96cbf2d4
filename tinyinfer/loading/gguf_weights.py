"""Filling a model from a GGUF file: Q4_0 / Q4_1 linears become INT4 exactly, everything else dense.

`GGUFReader` presents a GGUF checkpoint (loading/gguf.py) through the interface of checkpoint.py's
safetensors `TensorReader` (`where`, `get`, `shape`), tensor values dequantized to float32 on access, so
`checkpoint.load_weights` fills the dense parameters with its usual name and shape checks, and the
model's dtype is applied in one rounding. Before that, `load_int4_linears` replaces every linear whose
GGUF sources are all Q4_0 or all Q4_1 (q, k, v of a fused qkv_proj; gate, up of gate_up_proj) by an
`Int4Linear` at group size 32 holding the file's own levels, scales and zeros (Q4_1: the float-offset
variant w = q*s + m; ops/int4_format.py), and hides those tensors from the reader. A linear that mixes
types, or whose shape the INT4 layout does not take, is dequantized to the model dtype, as are Q8_0,
Q5_x and the K-quants (no exact INT4 form, see gguf_tensors.py); `summary` says how many of each. On a
CPU, `load_q8_embedding` keeps a tied embedding stored Q8_0 as the file's bytes, shared by the
embedding and the lm_head (layers/q8.py).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from tinyinfer.config.errors import CheckpointError
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.layers.q8 import Q8Embedding, Q8Head
from tinyinfer.loading.checkpoint import hf_sources
from tinyinfer.loading.gguf import GGUFCheckpoint, GGUFTensor
from tinyinfer.loading.gguf_tensors import INT4_GROUP_SIZE
from tinyinfer.ops.int4_format import check_shape


class GGUFReader:
    """checkpoint.TensorReader's interface over a GGUF file: HF name -> dense float32 tensor."""

    def __init__(self, ckpt: GGUFCheckpoint):
        self.tensors: dict[str, GGUFTensor] = dict(ckpt.tensors)
        self.where: dict[str, str] = {name: ckpt.path for name in self.tensors}
        self.path = ckpt.path

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.path} lacks tensor {name}")
        return self.tensors[name].dense(torch.float32)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)


def _int4_parts(parts: list[GGUFTensor]) -> bool:
    """True when every part repacks exactly into INT4 with the same kind of zero (Q4_0 or Q4_1)."""
    return all(p.is_int4 for p in parts) and len({p.ggml_type for p in parts}) == 1


def load_int4_linears(model: nn.Module, reader: GGUFReader, dtype: torch.dtype,
                      device: torch.device) -> list[str]:
    """Replace each nn.Linear whose GGUF tensors are all Q4_0 or all Q4_1 by an exact Int4Linear (g32);
    their weights leave the reader (a bias stays: load_weights fills it). Returns the replaced
    module names; a linear that mixes types or has a shape INT4 cannot take stays dense."""
    arch = getattr(getattr(model, "cfg", None), "architecture", None)
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        sources = hf_sources(f"{name}.weight", arch)
        if not all(s in reader for s in sources):
            continue                              # load_weights reports the missing tensor
        parts = [reader.tensors[s] for s in sources]
        if not _int4_parts(parts):
            continue
        n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
        try:
            check_shape(n, k, INT4_GROUP_SIZE)
        except ValueError:
            continue
        if (n, k) != tuple(module.weight.shape):
            raise CheckpointError(f"{', '.join(sources)} give a ({n}, {k}) weight; the model expects "
                                  f"{tuple(module.weight.shape)} for {name} (config and tensors disagree)")
        q, s, z = (torch.cat(t) for t in zip(*(p.int4() for p in parts)))    # concatenated along N
        bias = None if module.bias is None else torch.zeros(n, dtype=dtype, device=device)
        layer = Int4Linear.from_quantized(q.to(device), s.to(device), z.to(device), INT4_GROUP_SIZE,
                                          dtype, bias=bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        for s_name in sources:
            reader.where.pop(s_name)
        done.append(name)
    return done


def load_q8_embedding(model: nn.Module, reader: GGUFReader, dtype: torch.dtype,
                      device: torch.device) -> bool:
    """On a CPU, a tied embedding the file stores Q8_0 becomes a Q8Embedding and the lm_head a Q8Head
    over its bytes (one copy, the file's own values; the tensor leaves the reader). -> whether it did."""
    name = "model.embed_tokens.weight"
    tensor = reader.tensors.get(name)
    if (device.type != "cpu" or tensor is None or tensor.ggml_type != "Q8_0" or name not in reader.where
            or not model.cfg.tie_word_embeddings or getattr(model, "group", None) is not None
            or tuple(tensor.shape) != tuple(model.embed_tokens.weight.shape)):
        return False
    qs, d = tensor.q8_0()
    model.embed_tokens = Q8Embedding(qs.to(device), d.to(device), dtype)
    model.lm_head = Q8Head(model.embed_tokens)
    reader.where.pop(name)
    return True


def summary(reader: GGUFReader, replaced: list[str], dtype: torch.dtype) -> str:
    """One line for the user, after `load_int4_linears`: which tensors went to INT4 exactly and which
    are dequantized to the model dtype (and why, for Q4 tensors)."""
    types = Counter(t.ggml_type for t in reader.tensors.values())
    left = Counter(reader.tensors[n].ggml_type for n in reader.where)        # loaded dense
    dt = str(dtype).replace("torch.", "")
    line = (f"GGUF tensors {', '.join(f'{t} x{n}' for t, n in sorted(types.items()))}: "
            f"{len(replaced)} linears in INT4 g32 (the file's Q4 blocks, exact)")
    dequantized = sorted((t, n) for t, n in left.items() if t not in ("F32", "F16", "BF16"))
    if dequantized:
        line += f"; dequantized to {dt}: {', '.join(f'{t} x{n}' for t, n in dequantized)}"
        if any(t in ("Q4_0", "Q4_1") for t, _ in dequantized):
            line += (" (Q4 tensors outside a linear -- the embedding -- or in a linear that mixes "
                     "types or has a shape INT4 does not take)")
    if "model.embed_tokens.weight" in reader.tensors and "model.embed_tokens.weight" not in reader.where:
        line += "; the tied embedding and lm_head share the file's Q8_0 bytes"
    return line
