"""The shipped CUDA kernels on the CPU: each tests/host/emulate_<name>.cpp includes a kernel source from
cuda/ with TINYINFER_EMULATE defined, so g++ compiles the very code nvcc compiles, against the CUDA
stand-in of tests/host/emulate_cuda.h (fibers as threads, real barriers, deferred cp.async, clusters)
and the PTX host implementations of tests/host/emulate_ptx.h (mma / ldmatrix fragment layouts as the PTX
ISA documents them). Each program compares with a float64 (or exact) reference on hostile inputs and
exits non-zero on any mismatch, unwritten (NaN-poisoned) output or out-of-bounds copy.

The default run is the quick subset (CI); TINYINFER_EMULATE_FULL=1 passes --full to every program
(more shapes, both dtypes everywhere, longer sequences; minutes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST = REPO / "tests" / "host"
CXX = shutil.which("g++")
FULL = os.environ.get("TINYINFER_EMULATE_FULL") == "1"
# (program, what it proves)
PROGRAMS = {
    "emulate_ptx": "mma.m16n8k16 / ldmatrix / packed-math emulation equals plain matrix products",
    "emulate_int4": "INT4 linear M 1..64 (GEMV / GEMM tiles, split-K clusters, float offsets) and the "
                    "dequantize kernel equal float64",
    "emulate_paged_attention": "tensor-core paged attention (decode, verify q_len 5-16, MHA/GQA/MQA, MLA "
                               "576/512, one and several partitions) equals float64",
    "emulate_rope": "RoPE from the cos/sin table + K/V write is bit for bit the rotate_half formula",
    "emulate_silu_mul": "SwiGLU's activation silu(gate) * up is bit for bit the two rounded ops",
    "emulate_kv_quant": "the quantized KV cache: e4m3 codes and nearest-even encoding, the int8 / fp8 K/V "
                        "write against float64, paged attention over int8 / fp8 caches (GQA, verify, MLA) "
                        "against float64 attention of the dequantized values",
}


@pytest.mark.skipif(CXX is None, reason="no g++ on PATH: the CPU emulation of the kernels is not built")
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_emulated_kernel_matches_reference(program: str, tmp_path: Path):
    binary = tmp_path / program
    build = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                            "-I", str(REPO / "cuda"), "-I", str(HOST), str(HOST / f"{program}.cpp"),
                            "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, f"{program}.cpp does not compile:\n{build.stderr[-6000:]}"
    assert "warning" not in build.stderr, f"{program}.cpp compiles with warnings:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(binary)] + (["--full"] if FULL else []), capture_output=True, text=True,
                         timeout=3600 if FULL else 300)
    assert run.returncode == 0, f"{program} ({PROGRAMS[program]}) failed:\n{run.stdout[-6000:]}{run.stderr[-2000:]}"
