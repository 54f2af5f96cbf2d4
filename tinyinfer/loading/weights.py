"""A checkpoint, loaded: the model built on its device and filled with the checkpoint's weights.

One entry point for every weight format the engine reads: a dense Hugging Face checkpoint (optionally
quantized to INT4 after loading), tinyinfer's own INT4 file, GPTQ / AWQ directories (quant/io.py), and
GGUF files (their Q4_0 / Q4_1 linears as exact INT4, the rest dense: loading/gguf_weights.py).
With a `Shard` (tensor parallelism, loading/shard.py) it builds and fills one rank's shard instead,
reading only that rank's slices (dense and tinyinfer INT4 safetensors files).
"""
from __future__ import annotations

import ctypes
import sys
from typing import Callable, Optional

import torch
from torch import nn

from tinyinfer.config.errors import CheckpointError, ConfigError
from tinyinfer.config.model import ModelConfig, parse_dtype
from tinyinfer.layers.linear import Int4Linear, Linear
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading import gguf_weights, validate
from tinyinfer.loading.gptq_awq import load_gptq_awq
from tinyinfer.loading.shard import Shard, check_files
from tinyinfer.models.transformer import Transformer, build_model
from tinyinfer.ops import cpu_matmul
from tinyinfer.ops.int4_format import GROUP_SIZES
from tinyinfer.quant.io import is_int4_file, load_int4
from tinyinfer.quant.quantizer import quantize_model

QUANT_MODES = (None, "int4")


def check_quant(quant: Optional[str], group_size: Optional[int] = None) -> None:
    """Refuse an unknown quant mode, and a group size without on-the-fly INT4 or outside 32/64/128."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported; use None or 'int4'")
    if group_size is not None and (quant is None or group_size not in GROUP_SIZES):
        raise ValueError(f"group_size={group_size!r}: give one of {GROUP_SIZES}, with quant='int4' "
                         "(the group size of on-the-fly INT4 quantization)")


def stored_dtype(cfg: ModelConfig) -> torch.dtype:
    """The checkpoint's own dtype (config.json's torch_dtype; bfloat16 when it names another): what
    `python -m tinyinfer.quantize` keeps the unquantized tensors in."""
    return parse_dtype(cfg.dtype if cfg.dtype in ("bfloat16", "float16", "float32") else "bfloat16")


def has_int4_weights(files: ckpt.CheckpointFiles, quant: Optional[str] = None) -> bool:
    """Whether the loaded model will hold INT4 linears (quantized on the fly, an INT4 file, a GPTQ /
    AWQ directory, or a GGUF file with Q4_0 / Q4_1 tensors)."""
    if quant == "int4" or is_int4_file(files.metadata) or "quantization_config" in files.config:
        return True
    return files.gguf is not None and any(t.is_int4 for t in files.gguf.tensors.values())


def choose_dtype(cfg: ModelConfig, device: torch.device, requested: Optional[str] = None,
                 int4: bool = False) -> torch.dtype:
    """The model dtype: as requested, else on a CPU float32 (fast matmuls, exact parity) -- bfloat16
    when the model holds INT4 linears (`int4`), the dtype the CPU INT4 matmul takes (ops/cpu_matmul.py)
    -- and on a GPU the checkpoint's own half precision (bf16 when the checkpoint is float32)."""
    if requested is not None:
        return parse_dtype(requested)
    if device.type == "cpu":
        return torch.bfloat16 if int4 else torch.float32
    return parse_dtype(cfg.dtype if cfg.dtype in ("bfloat16", "float16") else "bfloat16")


def load_model(files: ckpt.CheckpointFiles, cfg: ModelConfig, dtype: torch.dtype,
               device: torch.device, quant: Optional[str] = None, group_size: int = 128,
               say: Callable[[str], None] = lambda msg: None, shard: Optional[Shard] = None,
               q8_head: bool = True) -> Transformer:
    """Build the model for `cfg` on `device` and fill it from `files` (INT4 files, GPTQ/AWQ
    directories, GGUF files, or dense weights quantized after loading when quant="int4", at
    `group_size` (quant/plan.py): then every linear still dense is quantized, a GGUF file's
    dequantized ones included). With `shard`: only that rank's shard (its model's cfg is
    shard.local). q8_head=False: a GGUF's Q8_0 tied embedding is dequantized like any other tensor
    (tinyinfer.quantize writes it as a dense weight)."""
    model = _load(files, cfg, dtype, device, quant, group_size, say, shard, q8_head)
    if device.type == "cpu":
        convert_for_cpu(model)
    release_freed_heap()
    return model


def convert_for_cpu(model: nn.Module) -> None:
    """Convert each linear's weight into the form its CPU kernel multiplies by (ops/cpu_matmul.py)
    now rather than at its first call: the conversions' temporaries are then freed with loading's,
    and the memory after loading is the memory the model runs in."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            cpu_matmul.convert_int4(m.qweight, m.scales, m.zeros, m.in_features, m.dtype)
        elif isinstance(m, Linear):
            cpu_matmul.convert_linear(m.weight)


def release_freed_heap() -> None:
    """Hand the memory loading freed (dequantized float32 tensors, repacking temporaries) back to
    the OS. glibc's malloc keeps freed blocks of up to 32 MiB in its heap for reuse, where they
    count against the process for its whole life: 100-300 MiB after loading SmolLM2 on a CPU
    (docs/cpu-performance.md). `malloc_trim(0)` returns them; other C libraries: nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):             # not glibc (musl has no malloc_trim)
        return
    trim(0)


def _load(files: ckpt.CheckpointFiles, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
          quant: Optional[str], group_size: int, say: Callable[[str], None],
          shard: Optional[Shard], q8_head: bool = True) -> Transformer:
    check_quant(quant)
    gguf = files.gguf is not None
    if shard is not None:
        check_files(files, shard.size)
    reader = gguf_weights.GGUFReader(files.gguf) if gguf else ckpt.TensorReader(files.weight_files)
    # config.json against the tensors (layers, shapes, dtypes) and memory, before allocating.
    try:
        validate.check_checkpoint(cfg, reader, dtype, device, our_names=is_int4_file(files.metadata),
                                  local=None if shard is None else shard.local)
    except (ConfigError, CheckpointError) as err:   # a GGUF file's config is its metadata: name it
        path = files.weight_files[0]
        if not gguf or path in str(err):
            raise
        raise type(err)(f"{path}: " + str(err).replace("fix config.json", "the GGUF metadata "
                                                        "disagrees with its tensors")) from None
    if shard is not None:
        cfg, reader = shard.local, shard.reader(reader)
    model = build_model(cfg, dtype, device, None if shard is None else shard.group)
    # A progress bar for checkpoints over 1 GiB.
    progress = sum(p.numel() for p in model.parameters()) * dtype.itemsize > (1 << 30)
    if gguf:
        replaced = gguf_weights.load_int4_linears(model, reader, dtype, device)
        if quant is None and q8_head:
            gguf_weights.load_q8_embedding(model, reader, dtype, device)
        say(gguf_weights.summary(reader, replaced, dtype))
        ckpt.load_weights(model, reader, cfg.num_layers, cfg.tie_word_embeddings, dtype, device,
                          progress=progress)
        if quant == "int4":
            say(quantize_model(model, group_size, progress=progress).summary())
        return model
    if is_int4_file(files.metadata):
        load_int4(model, reader, files.metadata, dtype, device)
        return model
    prequantized = "quantization_config" in files.config
    if prequantized:
        load_gptq_awq(model, reader, files.config, dtype, device)
    ckpt.load_weights(model, reader, cfg.num_layers, cfg.tie_word_embeddings, dtype, device,
                      progress=progress)
    if quant == "int4" and not prequantized:
        say(quantize_model(model, group_size, progress=progress).summary())
    return model
