"""Loading a GGUF checkpoint (llama.cpp's single-file format, specified in the ggml project's GGUF
document).

    ckpt = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.config              # Hugging Face config.json as a dict (gguf_config.py)
    ckpt.generation_config   # {"bos_token_id", "eos_token_id", "pad_token_id"} as the file names them
    ckpt.chat_template       # the Jinja chat template (tokenizer.chat_template) or None
    ckpt.tensors[name]       # GGUFTensor under its Hugging Face name, read lazily (gguf_tensors.py):
                             #   .dense(dtype) for any type, .int4() for Q4_0 / Q4_1 (exact, g32)
    ckpt.tokenizer()         # GGUFTokenizer: a tokenizers.Tokenizer plus BOS/EOS (gguf_tokenizer.py)

The file is parsed by the `gguf` package (llama.cpp's own reader) and memory-mapped: opening it reads
the header only; each tensor is read when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from tinyinfer.loading.gguf_config import architecture, generation_config, hf_config, is_mixtral
from tinyinfer.loading.gguf_file import GGUFError, Metadata, open_reader
from tinyinfer.loading.gguf_tensors import GGUFTensor, check_types, hf_shape, map_tensors
from tinyinfer.loading.gguf_tokenizer import GGUFTokenizer, build_tokenizer

GGUF_MAGIC = b"GGUF"

__all__ = ["GGUFCheckpoint", "GGUFError", "GGUFTensor", "GGUFTokenizer", "is_gguf", "load_gguf"]


def is_gguf(path: str) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass
class GGUFCheckpoint:
    path: str
    architecture: str                  # GGUF general.architecture, e.g. "llama"
    config: dict[str, Any]             # Hugging Face config.json form
    generation_config: dict[str, Any]
    chat_template: Optional[str]
    tensors: dict[str, GGUFTensor]     # Hugging Face name -> lazy tensor
    metadata: Metadata

    def tokenizer(self) -> GGUFTokenizer:
        """The file's tokenizer; a vocabulary the tokenizers library refuses (a corrupt token or
        merge) is a GGUFError naming the file and the keys it comes from."""
        try:
            return build_tokenizer(self.metadata)
        except GGUFError:
            raise
        except Exception as err:                    # tokenizers' BPE / Unigram builders, on bad input
            kind = self.metadata.get("tokenizer.ggml.model")
            keys = ("tokenizer.ggml.tokens and tokenizer.ggml.merges" if kind == "gpt2" else
                    "tokenizer.ggml.tokens and tokenizer.ggml.scores")
            raise GGUFError(f"{self.path}: the vocabulary in {keys} does not build a tokenizer "
                            f"({type(err).__name__}: {str(err)[:200]}); the file is corrupt: "
                            "re-download it") from None


def _vocab_size(meta: Metadata, arch: str, reader) -> int:
    tokens = meta.get("tokenizer.ggml.tokens")
    size = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{meta.path}: the file has no token_embd.weight (token embeddings)")
    rows = hf_shape(embed)[0]
    if size is None:
        size = rows
    if size != rows:
        raise GGUFError(f"{meta.path}: token_embd.weight has {rows} rows but the vocabulary has "
                        f"{size} tokens; the file is inconsistent")
    return size


def load_gguf(path: str) -> GGUFCheckpoint:
    """Open a .gguf file: config, generation config, chat template and lazy tensors."""
    reader, header = open_reader(path)
    meta = Metadata(header, path)
    arch = architecture(meta)
    types = check_types(reader, path)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and types[freqs.name] != "F32":
        raise GGUFError(f"{path}: rope_freqs.weight is {types[freqs.name]}; expected F32")
    config = hf_config(meta, types, _vocab_size(meta, arch, reader),
                       None if freqs is None else np.array(freqs.data))
    family = "mixtral" if is_mixtral(meta, arch) else arch
    tensors = map_tensors(reader, path, family, config["num_attention_heads"],
                          config["num_key_value_heads"])
    return GGUFCheckpoint(path, arch, config, generation_config(meta),
                          meta.get("tokenizer.chat_template"), tensors, meta)
