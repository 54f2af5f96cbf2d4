"""Opening a GGUF file and reading its metadata (llama.cpp's format, specified in the ggml project's
GGUF document).

A GGUF file is a header of typed key/value metadata (`general.architecture`, `llama.block_count`,
`tokenizer.ggml.tokens`, ...), a table of tensor descriptions and the tensor data. The parsing itself is
done by the `gguf` package (llama.cpp's own Python reader, `gguf.GGUFReader`, memory-mapped); this
module only wraps it with errors that name the file and the key, and turns field values into Python
values.

Float32 scalars: GGUF stores hyper-parameters such as rms_norm_eps as float32. We return the shortest
decimal that rounds to the same float32 (1e-05, not 9.999999747378752e-06) -- the value the model's own
config.json held before conversion; both are the same float32.
"""
from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np


class GGUFError(ValueError):
    """A GGUF file cannot be loaded: unreadable, truncated, or asks for something unsupported."""


_MISSING = object()


def open_reader(path: str) -> gguf.GGUFReader:
    """Parse the header of the .gguf file at `path` (tensor data stays memory-mapped, unread)."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on corrupt headers
        raise GGUFError(f"cannot read {path} as GGUF: {type(e).__name__}: {e} "
                        "(truncated or corrupt file? re-download it)") from None
    if reader.byte_order != "I":
        raise GGUFError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: tensor {t.name} should hold {t.n_bytes} bytes but the file "
                            f"ends after {t.data.nbytes} (truncated file? re-download it)")
    return reader


def _scalar(value: Any, vtype: gguf.GGUFValueType) -> Any:
    if vtype == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))          # shortest decimal of this float32
    if vtype == gguf.GGUFValueType.BOOL:
        return bool(value)
    if vtype == gguf.GGUFValueType.FLOAT64:
        return float(value)
    return int(value)


class Metadata:
    """Read-only view of a GGUF file's key/value metadata; values are converted on access."""

    def __init__(self, reader: gguf.GGUFReader, path: str):
        self._fields = reader.fields
        self.path = path
        self._cache: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self) -> list[str]:
        return list(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._fields:
            return default
        if key not in self._cache:
            self._cache[key] = self._convert(key)
        return self._cache[key]

    def require(self, key: str, what: str = "") -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            need = f" (needed for {what})" if what else ""
            raise GGUFError(f"{self.path}: GGUF metadata lacks the required key {key!r}{need}; "
                            "the file is incomplete or was written by an old converter")
        return value

    def _convert(self, key: str) -> Any:
        field = self._fields[key]
        types = field.types
        if not types:
            raise GGUFError(f"{self.path}: metadata key {key!r} has no type")
        main = types[0]
        if main == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        if main != gguf.GGUFValueType.ARRAY:
            return _scalar(field.parts[field.data[0]][0], main)
        sub = types[-1] if len(types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if sub == gguf.GGUFValueType.ARRAY:
            raise GGUFError(f"{self.path}: metadata key {key!r} is a nested array, not supported")
        if sub == gguf.GGUFValueType.FLOAT32:      # token scores: keep the exact float32 values
            return [float(field.parts[i][0]) for i in field.data]
        return [_scalar(field.parts[i][0], sub) for i in field.data] if sub is not None else []
