"""Which slice of a checkpoint each tensor-parallel rank holds, read without loading the rest
(Megatron-style sharding: Shoeybi et al., "Megatron-LM", 2019).

`local_config` is one rank's slice of the config; `ShardedReader` reads only that rank's slice of each
tensor, so no rank ever materialises the whole model. docs/tensor-parallel.md has the slice of each
tensor by name and the shapes per rank.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from tinyinfer.config.errors import CheckpointError
from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.parallel import ParallelGroup
from tinyinfer.loading.checkpoint import CheckpointFiles, TensorReader
from tinyinfer.models.transformer import Transformer
from tinyinfer.ops.int4_format import TILE_N
from tinyinfer.quant.io import is_int4_file
from tinyinfer.quant.plan import plan_int4

# A tensor's slice follows the module it belongs to (Hugging Face names, or ours in a tinyinfer INT4
# file); docs/tensor-parallel.md has the table.
COLUMN = {"q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj", "w1", "w3", "embed_tokens",
          "lm_head"}
KV_HEADS = {"k_proj", "v_proj"}
ROW = {"o_proj", "down_proj", "w2"}
OUTPUT_FIRST = {"weight", "bias", "qweight", "scales", "zeros"}    # tensors whose dim 0 is the output
INT4_PARTS = {"qweight", "scales", "zeros"}


def _has(cfg: ModelConfig, moe: bool) -> bool:
    return any(cfg.is_moe_layer(i) == moe for i in range(cfg.num_layers))


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """Refuse a tensor_parallel_size the model cannot be split into, naming the field."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size={size!r}: give a positive integer (1 = one device)")
    need = [("num_attention_heads", cfg.num_heads), ("vocab_size", cfg.vocab_size)]
    if _has(cfg, moe=False):
        need.append(("intermediate_size", cfg.intermediate_size))
    if _has(cfg, moe=True):
        need.append(("moe_intermediate_size", cfg.moe_intermediate_size))
    for name, value in need:
        if value % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the model's {name} "
                             f"({value}): every rank must hold an equal slice; use a size that divides it")
    kv = cfg.num_kv_heads
    if not cfg.is_mla and kv % size and size % kv:
        raise ValueError(f"tensor_parallel_size={size} and num_key_value_heads={kv}: KV heads are split "
                         f"evenly (size divides {kv}) or each replicated on size/{kv} ranks (size a "
                         "multiple of it); use such a size")


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """One rank's slice of `cfg`: the layer classes built from it hold exactly that rank's shard."""
    heads = cfg.num_heads // size
    kv = heads if cfg.is_mla else max(1, cfg.num_kv_heads // size)
    moe = cfg.moe_intermediate_size // size if cfg.moe_intermediate_size else 0
    # A model without dense MLP layers (Mixtral) keeps its unused intermediate_size as it is.
    dense = cfg.intermediate_size // size if _has(cfg, moe=False) else cfg.intermediate_size
    return replace(cfg, num_heads=heads, num_kv_heads=kv, vocab_size=cfg.vocab_size // size,
                   intermediate_size=dense, moe_intermediate_size=moe, notes=[])


def check_files(files: CheckpointFiles, size: int) -> None:
    """Refuse, by format, the checkpoints a tensor-parallel rank cannot read a slice of."""
    if size == 1:
        return
    if files.gguf is not None:
        raise ValueError(f"tensor_parallel_size={size}: GGUF files ({files.weight_files[0]}) load on "
                         "one device only (their quantized blocks are not sliced per rank); use "
                         "tensor_parallel_size=1, or the model's safetensors checkpoint")
    if "quantization_config" in files.config and not is_int4_file(files.metadata):
        raise ValueError(f"tensor_parallel_size={size}: GPTQ / AWQ checkpoints load on one device only "
                         "(their packed tensors are not sliced per rank); use tensor_parallel_size=1, or "
                         "convert with python -m tinyinfer.quantize to a tinyinfer INT4 file, which shards")


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def check_int4_shards(cfg: ModelConfig, size: int, group_size: int) -> None:
    """Quantizing each rank's shard must give the slices of the one-device INT4 model: every linear
    keeps its group size (a row-parallel shard must not split a group) and whole 16-row tiles."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full_model, part_model = _meta_model(cfg), _meta_model(local_config(cfg, size))
        full, part = plan_int4(full_model, group_size), plan_int4(part_model, group_size)
    for name, g in full.groups.items():
        if part.groups.get(name) == g:
            continue
        n, k = full_model.get_submodule(name).weight.shape
        ln, lk = part_model.get_submodule(name).weight.shape
        why = (f"each rank's input width {lk} would split its groups of {g}" if lk % g else
               f"each rank's {ln} output rows are not whole INT4 tiles of {TILE_N}")
        raise ValueError(f"tensor_parallel_size={size} cannot shard INT4 g{g} layer {name} "
                         f"({n} x {k} -> {ln} x {lk} per rank): {why}; pick a smaller group_size or "
                         "another tensor_parallel_size")


@dataclass
class Shard:
    """Rank `rank` of `size`: what loading/weights.py needs to build and fill that rank's shard."""
    rank: int
    size: int
    config: ModelConfig                          # the whole model's
    group: Optional[ParallelGroup] = None        # the collectives of the built model
    local: ModelConfig = field(init=False)

    def __post_init__(self):
        check_shardable(self.config, self.size)
        self.local = local_config(self.config, self.size)

    def reader(self, reader: TensorReader) -> "ShardedReader":
        return ShardedReader(reader, self.config, self.rank, self.size)


class ShardedReader:
    """TensorReader's interface over rank `rank`'s slices (docs/tensor-parallel.md: which slice of what)."""

    def __init__(self, reader: TensorReader, cfg: ModelConfig, rank: int, size: int):
        self.inner, self.cfg, self.rank, self.size = reader, cfg, rank, size
        self.where = reader.where

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def _even(self, name: str, extent: int, offset: int = 0) -> list[tuple[int, int]]:
        if extent % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} cannot split {name}: {extent} rows or "
                             "columns do not divide evenly (does config.json match the weights?)")
        n = extent // self.size
        return [(offset + self.rank * n, offset + (self.rank + 1) * n)]

    def _kv(self, rows: int, offset: int = 0) -> list[tuple[int, int]]:
        heads = self.cfg.num_kv_heads
        d, local = rows // heads, max(1, heads // self.size)
        first = self.rank * heads // self.size
        return [(offset + first * d, offset + (first + local) * d)]

    def plan(self, name: str, shape: list[int]) -> tuple[Optional[int], list[tuple[int, int]]]:
        """(dim, [(start, stop), ...]) of this rank's part of tensor `name` (the ranges concatenated),
        (None, []) for a replicated tensor, (-1, []) for a row-parallel bias (rank 0 only)."""
        parts = name.split(".")
        leaf, kind = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
        if leaf in ROW:
            if kind == "bias":
                return -1, []
            if kind == "perm":
                raise ValueError(f"tensor_parallel_size={self.size}: {name} is an act-order permutation "
                                 "of a row-parallel layer's inputs, which cannot be split per rank")
            if kind in ("scales", "zeros") and shape[1] % self.size:
                raise ValueError(f"tensor_parallel_size={self.size} would split an INT4 group of "
                                 f"{name.rsplit('.', 1)[0]}: its {shape[1]} groups per row do not divide "
                                 "evenly; use a size that divides them (or quantize at a smaller group)")
            return 1, self._even(name, shape[1])
        if kind not in OUTPUT_FIRST or leaf not in COLUMN | KV_HEADS | {"qkv_proj", "gate_up_proj"}:
            return None, []
        rows = shape[0]
        if leaf in COLUMN:
            ranges = self._even(name, rows)
        elif leaf in KV_HEADS:
            ranges = self._kv(rows)
        elif leaf == "gate_up_proj":
            ranges = self._even(name, rows // 2) + self._even(name, rows // 2, rows // 2)
        else:                                               # qkv_proj: cat(q, k, v) along rows
            cfg = self.cfg
            q, kv = cfg.q_size, cfg.kv_size
            if rows != q + 2 * kv:
                raise CheckpointError(f"{name} has {rows} rows, the config's q + k + v give {q + 2 * kv}")
            ranges = self._even(name, q) + self._kv(kv, q) + self._kv(kv, q + kv)
        local = sum(b - a for a, b in ranges)
        if kind == "qweight" and local % TILE_N:
            raise ValueError(f"tensor_parallel_size={self.size}: each rank's {local} output rows of "
                             f"{name.rsplit('.', 1)[0]} are not whole INT4 tiles of {TILE_N}")
        return 0, ranges

    def shape(self, name: str) -> list[int]:
        shape = self.inner.shape(name)
        dim, ranges = self.plan(name, shape)
        if dim is not None and dim >= 0:
            shape[dim] = sum(b - a for a, b in ranges)
        return shape

    def get(self, name: str) -> torch.Tensor:
        dim, ranges = self.plan(name, self.inner.shape(name))
        if dim is None:
            return self.inner.get(name)
        if dim < 0:
            t = self.inner.get(name)
            return t if self.rank == 0 else torch.zeros_like(t)
        pieces = [self.inner.get_slice(name, dim, a, b) for a, b in ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
