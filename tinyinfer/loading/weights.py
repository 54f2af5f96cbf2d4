"""A checkpoint, loaded: the model built on its device and filled with the checkpoint's weights.

One entry point for every weight format the engine reads: a dense Hugging Face checkpoint (optionally
quantized to INT4 after loading), tinyinfer's own INT4 file, and GPTQ / AWQ directories (quant/io.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.config import ModelConfig, parse_dtype
from tinyinfer.models.transformer import Transformer, build_model
from tinyinfer.quant.io import is_int4_file, load_gptq_awq, load_int4
from tinyinfer.quant.quantizer import quantize_model

QUANT_MODES = (None, "int4")


def choose_dtype(cfg: ModelConfig, device: torch.device, requested: Optional[str] = None) -> torch.dtype:
    """The model dtype: as requested, else float32 on a CPU (fast matmuls, exact parity) and the
    checkpoint's own half precision on a GPU (bf16 when the checkpoint is float32)."""
    if requested is not None:
        return parse_dtype(requested)
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(cfg.dtype if cfg.dtype in ("bfloat16", "float16") else "bfloat16")


def load_model(files: ckpt.CheckpointFiles, cfg: ModelConfig, dtype: torch.dtype,
               device: torch.device, quant: Optional[str] = None) -> Transformer:
    """Build the model for `cfg` on `device` and fill it from `files` (INT4 files, GPTQ/AWQ
    directories, or dense weights quantized after loading when quant="int4")."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported; use None or 'int4'")
    model = build_model(cfg, dtype, device)
    reader = ckpt.TensorReader(files.weight_files)
    # A progress bar for checkpoints over 1 GiB.
    progress = sum(p.numel() for p in model.parameters()) * dtype.itemsize > (1 << 30)
    if is_int4_file(files.metadata):
        load_int4(model, reader, files.metadata, dtype, device)
        return model
    prequantized = "quantization_config" in files.config
    if prequantized:
        load_gptq_awq(model, reader, files.config, dtype, device)
    ckpt.load_weights(model, reader, cfg.num_layers, cfg.tie_word_embeddings, dtype, device,
                      progress=progress)
    if quant == "int4" and not prequantized:
        quantize_model(model, progress=progress)
    return model
