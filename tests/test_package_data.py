"""A plain (non-editable) `pip install .` carries the kernel sources: the wheel holds cpu/ and cuda/ as
tinyinfer/_csrc/ (setup.py's package_data), and installed from it, away from this checkout, tinyinfer
finds them there and builds its C++ CPU kernels into the user's cache (tinyinfer/extensions/)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tinyinfer.extensions import host_cxx

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_kernel_sources_and_builds_them_installed(tmp_path):
    import importlib.util
    # offline where setuptools is here; a venv without it (Python 3.12+) builds in isolation instead
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                    str(REPO), "-w", str(tmp_path / "dist")], check=True, timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("tinyinfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("cpu", "*.[ch]*"), ("cuda", "*.cu*")):
        for src in (REPO / folder).glob(pattern):
            assert f"tinyinfer/_csrc/{folder}/{src.name}" in names, src
    assert "tinyinfer/_csrc/cuda/bindings.cpp" in names and "tinyinfer/_csrc/cpu/ops.cpp" in names
    if shutil.which(host_cxx()) is None:
        pytest.skip("no C++ compiler: the installed copy cannot build its CPU kernels here")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = ("from tinyinfer.extensions import IN_CHECKOUT, cpu\n"
            "assert not IN_CHECKOUT and '_csrc' in str(cpu.CPU_DIR), cpu.CPU_DIR\n"
            "assert cpu.library() is not None\n"
            "print(cpu.build_directory())")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith(str(tmp_path / "cache" / "tinyinfer" / "build" / "cpu"))
    assert "building the C++ CPU kernels" in r.stderr
