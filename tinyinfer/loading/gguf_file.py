"""Opening a GGUF file and reading its metadata (llama.cpp's format, specified in the ggml project's
GGUF document).

A GGUF file is a header of typed key/value metadata (`general.architecture`, `llama.block_count`,
`tokenizer.ggml.tokens`, ...), a table of tensor descriptions and the tensor data, aligned to
`general.alignment` (32 by default). All integers are little-endian.

We parse the header here, in one pass over a memory map, instead of with `gguf.GGUFReader`: that reader
makes a numpy memmap view of every value of every array, which costs ~6 s on a 2-core machine for
SmolLM2's 49k-token vocabulary and its 49k merges (two list entries each); this pass reads numeric
arrays with one `np.frombuffer` and strings with `bytes.decode` -- ~0.1 s for the same file. Tensor data
is not read: each tensor is a numpy view of the memory map (shape as `gguf.GGUFReader` gives it:
dimensions outermost first; quantized types as rows of bytes), read when asked for. Type ids, block
sizes and dequantization stay the `gguf` package's (gguf.GGMLQuantizationType, GGML_QUANT_SIZES).

Float32 scalars: GGUF stores hyper-parameters such as rms_norm_eps as float32. We return the shortest
decimal that rounds to the same float32 (1e-05, not 9.999999747378752e-06) -- the value the model's own
config.json held before conversion; both are the same float32.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np


class GGUFError(ValueError):
    """A GGUF file cannot be loaded: unreadable, truncated, or asks for something unsupported."""


_MISSING = object()
_VERSIONS = (2, 3)
# GGUF value type id -> numpy dtype, for scalars and numeric arrays (8 STRING and 9 ARRAY apart)
_NUMERIC = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32, _BOOL, _FLOAT64 = 8, 9, 6, 7, 12
# tensor types read as typed numbers; every other type is rows of bytes (blocks)
_ELEMENT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
            "I32": np.int32, "I64": np.int64}


class _Nested:
    """An array of arrays: parsed past, refused when asked for."""


@dataclass(frozen=True, eq=False)
class FileTensor:
    """One tensor of the file, as GGUF describes it; `data` is a view of the memory map."""
    name: str                           # GGUF name, e.g. blk.0.attn_q.weight
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]              # GGUF order: ne0 (the innermost, K of a linear) first
    n_bytes: int
    data: np.ndarray                    # reversed(shape); quantized: (..., ne0 / block * block bytes)


class _Header:
    """Cursor over the memory-mapped header; every read checks it stays inside the file."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise EOFError(f"a field at byte {start} needs {n} bytes; the file has {self.size}")
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: ~50k), in one tight loop; bounds checked at the end
        (a slice past the end comes back short, which `take` then reports)."""
        if count * 8 > self.size - self.pos:
            raise EOFError(f"an array of {count} strings cannot fit in the file")
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            n = length(buf, pos)[0]
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        if len(out) < count or pos > size:
            raise EOFError(f"an array of {count} strings runs past the end of the file")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, count = self.u32(), self.u64()
            if sub == _STRING:
                return self.strings(count)
            if sub == _ARRAY:
                for _ in range(count):
                    self.value(_ARRAY)
                return _Nested()
            dtype = np.dtype(self._numeric(sub))
            start = self.take(count * dtype.itemsize)
            values = np.frombuffer(self.buf, dtype, count, start).tolist()
            return [bool(v) for v in values] if sub == _BOOL else values
        dtype = np.dtype(self._numeric(vtype))
        value = np.frombuffer(self.buf, dtype, 1, self.take(dtype.itemsize))[0]
        if vtype == _FLOAT32:
            return float(str(value))                    # shortest decimal of this float32
        if vtype == _BOOL:
            return bool(value)
        return float(value) if vtype == _FLOAT64 else int(value)

    @staticmethod
    def _numeric(vtype: int) -> str:
        if vtype not in _NUMERIC:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return _NUMERIC[vtype]


def _parse(path: str, buf: mmap.mmap) -> tuple[dict[str, Any], list[FileTensor]]:
    h = _Header(buf)
    if bytes(buf[h.take(4):4]) != b"GGUF":
        raise ValueError("the file does not start with the GGUF magic bytes")
    version = h.u32()
    if version & 0xFFFF == 0:
        raise GGUFError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version}; tinyinfer reads versions {_VERSIONS}")
    n_tensors, n_kv = h.u64(), h.u64()
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string()
        fields[key] = h.value(h.u32())
    infos = []
    for _ in range(n_tensors):
        name, n_dims = h.string(), h.u32()
        dims = tuple(h.u64() for _ in range(n_dims))
        infos.append((name, dims, h.u32(), h.u64()))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment = {align!r} is not a power of two")
    data_start = -(-h.pos // align) * align
    whole = np.frombuffer(buf, np.uint8)
    tensors, seen = [], set()
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise ValueError(f"two tensors are named {name}")
        seen.add(name)
        try:
            ggml_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has the unknown type id {type_id}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n_elems // block * block_bytes
        start = data_start + offset
        if start + n_bytes > len(buf):
            raise GGUFError(f"{path}: tensor {name} should hold {n_bytes} bytes but the file ends "
                            f"after {max(0, len(buf) - start)} (truncated file? re-download it)")
        shape = tuple(reversed(dims))
        raw = whole[start:start + n_bytes]
        if ggml_type.name in _ELEMENT:
            data = raw.view(_ELEMENT[ggml_type.name]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes) if shape else raw
        tensors.append(FileTensor(name, ggml_type, dims, n_bytes, data))
    return fields, tensors


class GGUFFile:
    """A parsed GGUF file: `fields` (key -> Python value) and `tensors` (FileTensor, file order)."""

    def __init__(self, path: str, fields: dict[str, Any], tensors: list[FileTensor]):
        self.path, self.fields, self.tensors = path, fields, tensors


def open_reader(path: str) -> GGUFFile:
    """Parse the header of the .gguf file at `path` (tensor data stays memory-mapped, unread)."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        fields, tensors = _parse(path, buf)
    except GGUFError:
        raise
    except Exception as e:  # EOFError, ValueError, UnicodeDecodeError, struct.error on corrupt headers
        raise GGUFError(f"cannot read {path} as GGUF: {type(e).__name__}: {e} "
                        "(truncated or corrupt file? re-download it)") from None
    return GGUFFile(path, fields, tensors)


class Metadata:
    """Read-only view of a GGUF file's key/value metadata."""

    def __init__(self, reader: GGUFFile, path: str):
        self._fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self) -> list[str]:
        return list(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._fields:
            return default
        value = self._fields[key]
        if isinstance(value, _Nested):
            raise GGUFError(f"{self.path}: metadata key {key!r} is a nested array, not supported")
        return value

    def require(self, key: str, what: str = "") -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            need = f" (needed for {what})" if what else ""
            raise GGUFError(f"{self.path}: GGUF metadata lacks the required key {key!r}{need}; "
                            "the file is incomplete or was written by an old converter")
        return value
