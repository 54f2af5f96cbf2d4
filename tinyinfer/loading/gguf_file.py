"""Opening a GGUF file and reading its metadata (llama.cpp's format, specified in the ggml project's
GGUF document).

A GGUF file is a header of typed key/value metadata (`general.architecture`, `llama.block_count`,
`tokenizer.ggml.tokens`, ...), a table of tensor descriptions and the tensor data. The key/value section
is read by a bounded, validating scan (gguf_scan.py) that also checks the tensor table; the tensor
table is then parsed by the `gguf` package (llama.cpp's own Python reader, `gguf.GGUFReader`,
memory-mapped), told to skip the key/value section it would otherwise parse without bounds.

Float32 scalars: GGUF stores hyper-parameters such as rms_norm_eps as float32. We return the shortest
decimal that rounds to the same float32 (1e-05, not 9.999999747378752e-06) -- the value the model's own
config.json held before conversion; both are the same float32.
"""
from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from tinyinfer.loading.gguf_scan import GGUFError, Header, Nested, scan

__all__ = ["GGUFError", "Metadata", "open_reader"]


_MISSING = object()


class _TensorReader(gguf.GGUFReader):
    """gguf.GGUFReader that takes the key/value section as scanned instead of parsing it."""

    def __init__(self, path: str, header: Header):
        self._header = header
        super().__init__(path)

    def _build_fields(self, offs: int, count: int) -> int:
        if "general.alignment" in self._header.fields:   # the one field the reader itself reads
            self.fields["general.alignment"] = gguf.ReaderField(
                offs, "general.alignment", [np.array([self._header.alignment], np.uint32)], [0],
                [gguf.GGUFValueType.UINT32])
        return self._header.kv_end


def open_reader(path: str) -> tuple[gguf.GGUFReader, Header]:
    """Scan the header of the .gguf file at `path` and parse its tensor table (tensor data stays
    memory-mapped, unread)."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path!r} does not exist")
    header = scan(path)                           # refuses big-endian files too
    try:
        reader = _TensorReader(path, header)
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError on corrupt headers
        raise GGUFError(f"cannot read {path} as GGUF: {type(e).__name__}: {e} "
                        "(truncated or corrupt file? re-download it)") from None
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: tensor {t.name} should hold {t.n_bytes} bytes but the file "
                            f"ends after {t.data.nbytes} (truncated file? re-download it)")
    return reader, header


class Metadata:
    """Read-only view of a GGUF file's key/value metadata (as gguf_scan.py read it)."""

    def __init__(self, header: Header, path: str):
        self._fields = header.fields
        self._types = header.types
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self) -> list[str]:
        return list(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._fields:
            return default
        value = self._fields[key]
        if isinstance(value, Nested):
            raise GGUFError(f"{self.path}: metadata key {key!r} is a nested array, not supported")
        if self._types[key] == gguf.GGUFValueType.FLOAT32:
            return float(str(np.float32(value)))      # shortest decimal of this float32
        return value

    def require(self, key: str, what: str = "") -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            need = f" (needed for {what})" if what else ""
            raise GGUFError(f"{self.path}: GGUF metadata lacks the required key {key!r}{need}; "
                            "the file is incomplete or was written by an old converter")
        return value
