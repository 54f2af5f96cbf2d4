"""Host-compiled unit tests of the CUDA helpers: every tests/host/test_*.cpp is built with g++ (with
cuda/ on the include path) and run; it passes when it exits 0. The `__host__ __device__` index and
dequant math in cuda/*.cuh is thereby checked on every CPU machine, long before a GPU run.

To add one: drop tests/host/test_<family>.cpp (a main() that returns non-zero on failure) -- nothing
else to edit.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_TESTS = sorted((REPO / "tests" / "host").glob("test_*.cpp"))
CXX = shutil.which("g++") or shutil.which("c++")
# C++17 is what the kernels must stay within (the GPU machines' torch may compile .cu files as C++17).
FLAGS = ["-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-I", str(REPO / "cuda")]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on PATH: host helper tests not built")
@pytest.mark.parametrize("source", HOST_TESTS, ids=[p.stem for p in HOST_TESTS])
def test_host_program_passes(source: Path, tmp_path: Path):
    binary = tmp_path / source.stem
    build = subprocess.run([CXX, *FLAGS, str(source), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, f"{source.name} does not compile:\n{build.stderr[-6000:]}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{source.name} failed (exit {run.returncode}):\n{run.stdout[-6000:]}{run.stderr[-2000:]}"


def test_there_are_host_tests():
    assert any(p.name == "test_common.cpp" for p in HOST_TESTS), "tests/host/test_common.cpp is missing"
