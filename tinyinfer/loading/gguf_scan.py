"""A bounded, validating scan of a GGUF file's header (ggml's GGUF document: magic, version, tensor and
key/value counts, the key/value pairs, the tensor table), run before anything the file declares is
allocated.

Why not the `gguf` package's reader alone: it trusts every length and builds a numpy view per array
element as it parses (~50 us and ~1.5 KB per string on a 2-core Xeon: 2**22 empty strings took 109 s
and 7.9 GB; an array declaring 2**40 elements grows until the process is killed). So this scan reads
the key/value section itself -- every length checked against the bytes left in the file and against
the ceilings below before it is used -- and returns the values; the reader is then told to skip that
section (gguf_file.py) and parses only the tensor table, which this scan has checked too: at most
MAX_TENSORS entries, 1..4 dimensions, a known type, data aligned, inside the file and not
overlapping another tensor's.

The ceilings are far above real files (a 262k vocabulary, 300k merges, ~2k tensors, templates of
KBs) and keep a refused file's cost to seconds and tens of MB.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

MAX_KEYS = 2**16
MAX_TENSORS = 2**16
MAX_ARRAY = 2**20            # elements of one metadata array
MAX_STRING = 2**26           # bytes of one string (key, value or array element)
MAX_DIMS = 4                 # ggml's GGML_MAX_DIMS

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}            # GGUFValueType -> numpy dtype
_STRING, _ARRAY, _BOOL, _F32 = 8, 9, 7, 6


class GGUFError(ValueError):
    """A GGUF file cannot be loaded: unreadable, truncated, or asks for something unsupported."""


class Nested:
    """A metadata value that is an array of arrays (refused when a key that matters holds one)."""


@dataclass
class Header:
    version: int
    fields: dict[str, Any]                  # key -> Python value (str, int, float, bool, list, Nested)
    types: dict[str, int] = field(default_factory=dict)   # key -> GGUFValueType of the value
    kv_end: int = 0                         # offset where the tensor table starts
    alignment: int = 32


class _Scan:
    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> "GGUFError":
        return GGUFError(f"cannot read {self.path} as GGUF: {what} (truncated or corrupt file? "
                         "re-download it)")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file ends at "
                            f"{self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise self.fail(f"{what} declares {n} bytes (the ceiling is {MAX_STRING})")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not valid UTF-8 ({err.reason} at byte {err.start})") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _STRING:
            return self.string(f"metadata key {key!r}")
        if vtype in _SCALARS:
            return _python(np.frombuffer(self.buf, _SCALARS[vtype], 1,
                                         self.take(int(_SCALARS[vtype][2]), f"metadata key {key!r}")),
                           vtype)[0]
        if vtype != _ARRAY:
            raise self.fail(f"metadata key {key!r} has value type {vtype}, not a GGUF type")
        itype = self.unpack("<I", f"metadata key {key!r}")
        count = self.unpack("<Q", f"metadata key {key!r}")
        if count > MAX_ARRAY:
            raise self.fail(f"metadata key {key!r} declares an array of {count} elements (the "
                            f"ceiling is {MAX_ARRAY})")
        if itype == _STRING:
            return [self.string(f"metadata key {key!r} element {i}") for i in range(count)]
        if itype in _SCALARS:
            width = int(_SCALARS[itype][2])
            start = self.take(count * width, f"metadata key {key!r} ({count} elements)")
            return _python(np.frombuffer(self.buf, _SCALARS[itype], count, start), itype)
        if itype == _ARRAY:
            for _ in range(count):
                self.value(_ARRAY, key)
            return Nested()
        raise self.fail(f"metadata key {key!r} is an array of type {itype}, not a GGUF type")


def _python(values: np.ndarray, vtype: int) -> list:
    if vtype == _BOOL:
        return [bool(v) for v in values.tolist()]
    if vtype == _F32:
        return values.astype(np.float64).tolist()     # the exact float32 values
    return values.tolist()


def scan(path: str) -> Header:
    """Check the header of the GGUF file at `path` and read its metadata (GGUFError naming the
    file, the key or the tensor, and what is wrong)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFError(f"cannot read {path} as GGUF: {os.fstat(f.fileno()).st_size} bytes is "
                            "too short for a GGUF header (truncated or corrupt file? re-download it)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _header(_Scan(buf, path))


def _header(s: _Scan) -> Header:
    if s.buf[:4] != b"GGUF":
        raise s.fail("no GGUF magic at the start")
    s.pos = 4
    version = s.unpack("<I", "the version")
    if version & 0xFFFF == 0 and version:          # the version of a file written big-endian
        raise GGUFError(f"{s.path} is a big-endian GGUF file; only little-endian files are supported")
    if version not in (2, 3):
        raise s.fail(f"GGUF version {version}; versions 2 and 3 are read")
    n_tensors, n_keys = s.unpack("<Q", "the tensor count"), s.unpack("<Q", "the key count")
    if n_keys > MAX_KEYS or n_keys * 13 > s.size:           # a key/value takes 13 bytes at least
        raise s.fail(f"the header declares {n_keys} metadata keys (the ceiling is {MAX_KEYS})")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > s.size:   # a tensor entry takes 24 at least
        raise s.fail(f"the header declares {n_tensors} tensors (the ceiling is {MAX_TENSORS})")
    head = Header(version, {})
    for i in range(n_keys):
        key = s.string(f"metadata key #{i}'s name")
        vtype = s.unpack("<I", f"metadata key {key!r}")
        if key in head.fields:
            raise s.fail(f"metadata key {key!r} appears twice")
        head.fields[key], head.types[key] = s.value(vtype, key), vtype
    head.kv_end = s.pos
    align = head.fields.get("general.alignment", 32)
    if head.types.get("general.alignment", 4) != 4 or align <= 0 or align & (align - 1):
        raise s.fail(f"general.alignment is {align!r}; it must be a power of two (uint32)")
    head.alignment = align
    _tensors(s, n_tensors, align)
    return head


def _tensors(s: _Scan, count: int, align: int) -> None:
    entries = []
    for i in range(count):
        name = s.string(f"tensor #{i}'s name")
        n_dims = s.unpack("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise s.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
        dims = [s.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        ttype, offset = s.unpack("<I", f"tensor {name!r}"), s.unpack("<Q", f"tensor {name!r}")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise s.fail(f"tensor {name!r} has type {ttype}, not a ggml type") from None
        elems = int(np.prod(dims, dtype=object))
        if elems == 0 or dims[0] % block:
            raise s.fail(f"tensor {name!r} has shape {dims}: empty, or rows that are not whole "
                         f"blocks of {block}")
        if offset % align:
            raise s.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the "
                         f"alignment {align}")
        entries.append((offset, elems // block * type_size, name))
    data_start = -(-s.pos // align) * align
    entries.sort()
    for (off, nbytes, name), nxt in zip(entries, entries[1:] + [None]):
        if data_start + off + nbytes > s.size:
            raise s.fail(f"tensor {name!r} ({nbytes} bytes at data offset {off}) ends past the end "
                         f"of the file ({s.size} bytes; truncated?)")
        if nxt is not None and off + nbytes > nxt[0]:
            raise s.fail(f"tensors {name!r} and {nxt[2]!r} overlap (data offsets {off} + {nbytes} "
                         f"> {nxt[0]})")
