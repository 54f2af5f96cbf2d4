"""Test helper: hostile GGUF files (issue 24's cases and more), each with the error it must end in.

Header-level bombs are written by hand (struct), the rest as a valid synthetic Llama file
(gguf_util.write_gguf) patched in place: a metadata string's bytes, a tensor's data offset, a
merge. `CASES`: case id -> (how to write it into a path, the error class name, a regex its message
must match). `python tests/gguf_hostile.py DIR` (run by tests/test_gguf_hostile.py) writes each,
loads it in this process, and prints one JSON line per case: the error, its message, the seconds
the refusal took and the process's peak RSS so far (it only grows: a case that ballooned shows),
beside the peak once warmed up (imports, a valid file loaded). `... DIR flips SEED N`: N seeded
single-bit flips in each section of a valid synthetic model instead, each loaded by LLMEngine.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_util import VOCAB, base_meta, write_gguf  # noqa: E402


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _raw(path: str, n_tensors: int, kvs: bytes, n_keys: int, zeros: int = 0) -> None:
    """A header by hand; `zeros` bytes of zeros after it, as a sparse file (nothing in memory)."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_keys) + kvs)
        f.truncate(f.tell() + zeros)


def _array(key: bytes, itype: int, count: int) -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, itype, count)


def _valid(path: str, meta_extra=None, tensors=None) -> str:
    meta = base_meta("llama", layers=1)
    meta.update(meta_extra or {})
    ts = {"token_embd.weight": (np.zeros((VOCAB, 64), np.float32), "F32"),
          "output_norm.weight": (np.ones(64, np.float32), "F32")}
    return write_gguf(path, "llama", meta, tensors or ts)


def _patch(path: str, old: bytes, new: bytes) -> None:
    data = open(path, "rb").read()
    assert data.count(old) == 1 and len(old) == len(new), old
    open(path, "wb").write(data.replace(old, new))


def _tensor_offset_field(data: bytes, name: bytes) -> int:
    """Where the data-offset field of tensor `name`'s table entry is (1-D or 2-D entries)."""
    at = data.index(_s(name)) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims + 4


def _shift_offset(path: str, name: bytes, to=None, by: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    at = _tensor_offset_field(bytes(data), name)
    old = struct.unpack_from("<Q", data, at)[0]
    struct.pack_into("<Q", data, at, old + by if to is None else to)
    open(path, "wb").write(bytes(data))


def _misaligned(path):
    _valid(path)
    _shift_offset(path, b"output_norm.weight", by=1)


def _overlapping(path):
    _valid(path)
    _shift_offset(path, b"output_norm.weight", to=0)      # token_embd.weight's bytes


def _bad_utf8_value(path):
    _valid(path, {"general.name": "XXXXXXXX"})
    _patch(path, b"XXXXXXXX", b"XX\xff\xfeXXXX")


def _bad_utf8_key(path):
    _valid(path, {"general.zzzzzzzz": "x"})
    _patch(path, b"general.zzzzzzzz", b"general.zz\xc3(zzzz")


def _bad_merge(path):
    _valid(path)
    _patch(path, b"ab c", b"q% c")                         # a merge of a token not in the vocabulary


CASES = {   # GGUF errors reach the caller as CheckpointError (loading/checkpoint.py locate)
    # the issue's: an array of 2**40 elements, a valid 128 MB uint8 array, 2**22 empty strings
    "array_2e40": (lambda p: _raw(p, 0, _array(b"x", 0, 2**40), 1), "CheckpointError", "2\\d+ elements"),
    "uint8_128MB": (lambda p: _raw(p, 0, _array(b"x", 0, 2**27), 1, 2**27), "CheckpointError",
                    "134217728 elements"),
    "empty_strings_2e22": (lambda p: _raw(p, 0, _array(b"x", 8, 2**22), 1, 8 * 2**22),
                           "CheckpointError", "4194304 elements"),
    "string_2e60": (lambda p: _raw(p, 0, _s(b"x") + struct.pack("<IQ", 8, 2**60), 1), "CheckpointError",
                    "metadata key 'x' declares"),
    "keys_2e40": (lambda p: _raw(p, 0, b"", 2**40), "CheckpointError", "metadata keys"),
    "tensors_2e40": (lambda p: _raw(p, 2**40, b"", 0), "CheckpointError", "tensors"),
    "key_name_2e62": (lambda p: _raw(p, 0, struct.pack("<Q", 2**62), 1), "CheckpointError",
                      "name declares"),
    "dims_1000": (lambda p: _raw(p, 1, _s(b"t") + struct.pack("<I", 1000), 0), "CheckpointError",
                  "1000 dimensions"),
    "misaligned_tensor": (_misaligned, "CheckpointError", "not a multiple of the alignment"),
    "overlapping_tensors": (_overlapping, "CheckpointError", "overlap"),
    "bad_utf8_value": (_bad_utf8_value, "CheckpointError", "'general.name' is not valid UTF-8"),
    "bad_utf8_key": (_bad_utf8_key, "CheckpointError", "metadata key #\\d+'s name is not valid UTF-8"),
    "head_count_0": (lambda p: _valid(p, {"llama.attention.head_count": 0}), "ConfigError",
                     "head_count is 0"),
    "heads_not_dividing": (lambda p: _valid(p, {"llama.attention.head_count": 5,
                                                 "llama.attention.head_count_kv": 5}),
                           "ConfigError", "not a multiple of llama.attention.head_count 5"),
    "bad_merge": (_bad_merge, "CheckpointError", "tokenizer.ggml.merges does not build a tokenizer"),
}


def sections(path: str) -> dict[str, tuple[int, int]]:
    """Byte ranges of a GGUF file's header, key/values, tensor table and tensor data."""
    import gguf
    from tinyinfer.loading.gguf_scan import scan
    kv_end, data_start = scan(path).kv_end, gguf.GGUFReader(path).data_offset
    return {"header": (0, 24), "metadata": (24, kv_end), "tensor_table": (kv_end, data_start),
            "tensor_data": (data_start, os.path.getsize(path))}


def flip_cases(root: str, seed: int, per_section: int) -> dict:
    """`per_section` single-bit flips of a valid file in each section, seeded: case -> writer."""
    import random
    import pathlib
    from gguf_util import build
    base, _ = build(pathlib.Path(root), "llama")
    data, rng, out = open(base, "rb").read(), random.Random(seed), {}
    for name, (lo, hi) in sections(base).items():
        for i in range(per_section):
            at, bit = rng.randrange(lo, hi), rng.randrange(8)
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            out[f"flip_{name}_{i}_at{at}b{bit}"] = (lambda p, b=bytes(flipped): open(p, "wb").write(b))
    return out


def _load(path: str):
    from tinyinfer import LLMEngine
    LLMEngine(path, device="cpu", dtype="float32", max_kv_tokens=256)


def main(root: str, mode: str = "cases", seed: int = 0, count: int = 0) -> None:
    from tinyinfer.loading.checkpoint import locate
    from tinyinfer.loading.tokenizer import Tokenizer
    warm = _valid(os.path.join(root, "valid.gguf"))  # every lazy import done before the clock runs
    Tokenizer.for_checkpoint(locate(warm))
    if mode != "cases":
        import pathlib
        from gguf_util import build
        _load(build(pathlib.Path(root), "llama")[0])
    cases = CASES if mode == "cases" else flip_cases(root, seed, count)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # peak after warming
    for case, spec in cases.items():
        write = spec[0] if isinstance(spec, tuple) else spec
        path = os.path.join(root, f"{case}.gguf")
        write(path)
        t = time.perf_counter()
        try:
            Tokenizer.for_checkpoint(locate(path)) if mode == "cases" else _load(path)
            err = None
        except Exception as e:                      # noqa: BLE001 -- reported to the test
            err = e
        took = time.perf_counter() - t
        os.remove(path)
        print(json.dumps({"case": case, "error": type(err).__name__, "message": str(err)[:2000],
                          "seconds": took, "base_mb": base_mb,
                          "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *map(int, sys.argv[3:5]))
