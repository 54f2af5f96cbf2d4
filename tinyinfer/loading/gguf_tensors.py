"""GGUF tensors under their Hugging Face names, read lazily: dense, or repacked exactly as INT4.

Names. llama.cpp renames every tensor (`blk.3.attn_q.weight` = `model.layers.3.self_attn.q_proj.weight`)
and stores MoE experts stacked in one 3-D tensor per projection (`blk.3.ffn_gate_exps.weight`, E x N x K).
`map_tensors` gives each GGUF tensor -- each expert of a stacked one -- its Hugging Face checkpoint name
(Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1`) and its shape in Hugging
Face orientation: GGUF lists dimensions innermost first (ne0 = K), so (K, N) there is W (N, K) here.

RoPE row order. llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows
of q_proj / k_proj (weights and biases) of Llama-architecture models, Mixtral included, per head from
Hugging Face's "rotate half" layout [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] to interleaved pairs
(x_0, x_{d/2}, x_1, x_{d/2+1}, ...), because its RoPE kernel rotates adjacent pairs. We undo it:
HF row h*d + j*d/2 + i  <-  GGUF row h*d + 2*i + j. Qwen files are written unpermuted (their GGUF
RoPE is the "NeoX" half-split one), so nothing is done for them. Permuting rows is exact on dense
tensors and on INT4 (q, scales, zeros) alike: a row keeps its groups along K.

Types, and what `dense()` / `int4()` give:
  F32, F16, BF16         as stored, cast to the requested dtype.
  Q4_0, Q4_1             `int4()`: repacked EXACTLY into tinyinfer's INT4 at group size 32. A block is
                         32 weights of one row: Q4_0 stores d (fp16) and 4-bit q with w = d*(q - 8) ->
                         scales = d, zeros = 8 (uint8); Q4_1 stores d, m (fp16) with w = d*q + m ->
                         scales = d, zeros = m as a float16 tensor: the float-offset INT4 variant,
                         w = q*s + z. `dense()` dequantizes them (same values).
  Q8_0, Q5_0, Q5_1       dequantized (8- and 5-bit levels do not fit INT4's 16 levels).
  Q2_K..Q6_K (K-quants)  dequantized. Q5_K / Q6_K have 5- / 6-bit levels. Q4_K's levels are 4-bit but
                         its 32-weight sub-block scale is d * sc with d fp16 and sc a 6-bit integer: the
                         product needs up to 17 significant bits, fp16 scales hold 11, so no fp16 INT4
                         repack is exact (nor for the offset dmin * m); Q2_K / Q3_K likewise.
Dequantization is `gguf.quants.dequantize` (llama.cpp's reference formulas in numpy), in float32.
Anything else (IQ*, TQ*, MXFP4, ...) is refused by name when the file is opened.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np
import torch

from tinyinfer.loading.gguf_file import GGUFError

INT4_GROUP_SIZE = 32
INT4_TYPES = ("Q4_0", "Q4_1")
DEQUANTIZED_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + INT4_TYPES + DEQUANTIZED_TYPES

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {  # GGUF name inside blk.N -> HF name inside model.layers.N
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# MoE: router and stacked experts; "{e}" is the expert index.
_MOE = {
    "qwen3moe": {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
                 "ffn_up_exps": "mlp.experts.{e}.up_proj",
                 "ffn_down_exps": "mlp.experts.{e}.down_proj"},
    "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate",
                "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
                "ffn_up_exps": "block_sparse_moe.experts.{e}.w3"},
}
# Older Mixtral files store one tensor per expert: blk.N.ffn_gate.E.weight.
_LEGACY_EXPERT = {"ffn_gate": "ffn_gate_exps", "ffn_down": "ffn_down_exps", "ffn_up": "ffn_up_exps"}
_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)(?:\.(\d+))?\.(weight|bias)$")


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One Hugging Face tensor stored in a GGUF file; nothing is read until `dense` / `int4`."""
    name: str                       # Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str                  # e.g. blk.0.attn_q.weight
    ggml_type: str                  # storage type, e.g. "Q4_1"
    shape: tuple[int, ...]          # Hugging Face orientation: (N, K) for a linear, (N,) for a norm
    _source: gguf.ReaderTensor
    _expert: Optional[int] = None   # index into a stacked expert tensor
    _rope_heads: Optional[int] = None  # undo llama.cpp's q/k row permutation over this many heads

    @property
    def is_int4(self) -> bool:
        """True when `int4()` is available (Q4_0 / Q4_1: repacked exactly)."""
        return self.ggml_type in INT4_TYPES

    def _raw(self) -> np.ndarray:
        data = self._source.data
        return np.array(data if self._expert is None else data[self._expert])   # copy off the mmap

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as `dtype`, dequantized in float32 first if stored quantized."""
        raw = self._raw()
        if self.ggml_type in ("F32", "F16"):
            t = torch.from_numpy(raw)
        elif self.ggml_type == "BF16":
            t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[self.ggml_type]))
        return _unpermute(t.reshape(self.shape), self._rope_heads).to(dtype)

    def int4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tinyinfer INT4 at group size 32, exactly: q (N, K) uint8 levels 0..15, scales (N, K/32)
        float16, zeros (N, K/32): uint8 8 for Q4_0 (w = (q - z) * s), float16 m for Q4_1
        (w = q * s + z)."""
        if not self.is_int4:
            raise GGUFError(f"{self.gguf_name} is {self.ggml_type}; only Q4_0 and Q4_1 repack "
                            "exactly into INT4 -- use dense() for this tensor")
        n, k = self.shape
        blocks = torch.from_numpy(self._raw()).reshape(n, k // INT4_GROUP_SIZE, -1)  # (N, K/32, bytes)
        scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)      # (N, K/32)
        if self.ggml_type == "Q4_0":           # d, qs[16]
            zeros = torch.full(scales.shape, 8, dtype=torch.uint8)
            packed = blocks[..., 2:18]
        else:                                  # d, m, qs[16]
            zeros = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
            packed = blocks[..., 4:20]
        # byte j of a block: weight j in its low nibble, weight j + 16 in its high nibble
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k)
        heads = self._rope_heads
        return _unpermute(q, heads), _unpermute(scales, heads), _unpermute(zeros, heads)

    def q8_0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A Q8_0 tensor's own bytes: levels (N, K) int8 and scales (N, K/32) float16 (w = d q)."""
        if self.ggml_type != "Q8_0" or len(self.shape) != 2 or self._rope_heads is not None:
            raise GGUFError(f"{self.gguf_name} is {self.ggml_type} {self.shape}; q8_0() reads a 2-D Q8_0 "
                            "tensor -- use dense() for this one")
        n, k = self.shape
        blocks = torch.from_numpy(self._raw()).reshape(n, k // 32, 34)            # d (2 bytes), qs[32]
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)         # (N, K/32)
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), d


def _unpermute(t: torch.Tensor, heads: Optional[int]) -> torch.Tensor:
    """Rows of a llama.cpp-permuted q/k tensor (rows = heads * d, any trailing dims) in HF order."""
    if heads is None:
        return t
    rows = t.shape[0]
    if rows % (2 * heads):
        raise GGUFError(f"cannot undo the RoPE row permutation: {rows} rows do not split into "
                        f"{heads} heads of an even size")
    d = rows // heads
    return t.reshape(heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def hf_shape(source: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(source.shape.tolist()))


def check_types(reader: gguf.GGUFReader, path: str) -> dict[str, str]:
    """GGUF tensor name -> type name; an unsupported type is an error naming tensor and type."""
    types = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name} is stored as {name}, which tinyinfer does not "
                            f"read; supported types: {', '.join(SUPPORTED_TYPES)}")
        types[t.name] = name
    return types


def map_tensors(reader: gguf.GGUFReader, path: str, family: str, heads: int, kv_heads: int
                ) -> dict[str, GGUFTensor]:
    """Every tensor of the file under its Hugging Face name. `family`: llama | mixtral | qwen2 |
    qwen3 | qwen3moe; `heads` / `kv_heads` undo the q/k permutation of llama and mixtral files."""
    out: dict[str, GGUFTensor] = {}
    permuted = family in ("llama", "mixtral")
    for src in reader.tensors:
        shape = hf_shape(src)
        for name, expert, part in _hf_names(src.name, family, shape, path):
            rope = None
            if permuted and part in ("attn_q", "attn_k"):
                rope = heads if part == "attn_q" else kv_heads
            one = shape[1:] if expert is not None and len(shape) == 3 else shape
            if name in out:
                raise GGUFError(f"{path}: tensors {out[name].gguf_name} and {src.name} both map "
                                f"to {name}")
            out[name] = GGUFTensor(name, src.name, src.tensor_type.name, one, src, expert, rope)
    return out


def _hf_names(gguf_name: str, family: str, shape: tuple[int, ...], path: str
              ) -> list[tuple[str, Optional[int], str]]:
    """(HF name, expert index within the stored tensor or None, GGUF part) for one tensor."""
    base, _, suffix = gguf_name.rpartition(".")
    if gguf_name == "rope_freqs.weight" and family == "llama":
        return []                            # Llama 3 rope scaling: read into the config
    if base in _GLOBAL and suffix == "weight":
        return [(f"{_GLOBAL[base]}.weight", None, base)]
    m = _NAME.match(gguf_name)
    unknown = GGUFError(f"{path}: tensor {gguf_name} has no Hugging Face counterpart in a {family} "
                        "model (unexpected tensor for this architecture)")
    if m is None:
        raise unknown
    layer, part, legacy_expert, suffix = m.group(1), m.group(2), m.group(3), m.group(4)
    prefix = f"model.layers.{layer}."
    moe = _MOE.get(family, {})
    if legacy_expert is not None:            # blk.N.ffn_gate.E.weight (older Mixtral files)
        if family != "mixtral" or part not in _LEGACY_EXPERT:
            raise unknown
        hf = moe[_LEGACY_EXPERT[part]].format(e=int(legacy_expert))
        return [(f"{prefix}{hf}.{suffix}", None, part)]
    if part in moe and "{e}" in moe[part]:
        if len(shape) != 3:
            raise GGUFError(f"{path}: expert tensor {gguf_name} has shape {shape}; expected "
                            "(experts, rows, columns)")
        return [(f"{prefix}{moe[part].format(e=e)}.{suffix}", e, part) for e in range(shape[0])]
    table = {**_LAYER, **moe}
    if family in ("qwen3", "qwen3moe"):
        table.update(_QK_NORM)
    if part not in table:
        raise unknown
    return [(f"{prefix}{table[part]}.{suffix}", None, part)]
