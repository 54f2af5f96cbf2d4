"""The build of the CPU kernels: compile `cpu/` into the operator library `tinyinfer_cpu` and load it.

`cpu/ops.cpp` registers C++ kernels (paged attention read in place through the block table, RoPE +
K/V write) with torch's dispatcher; `tinyinfer/ops/cpu.py` calls them as the `cpu` kernels of the
engine's ops. They are compiled through `torch.utils.cpp_extension` (ninja, cached), just in time at
the first call on a CPU tensor -- a few seconds, once per machine: the sources include only the ATen
headers they use -- into `build/cpu/<torch>-<python>-<cpu>/`, for the CPU in front of us
(`-march=native`: AVX-512 where the CPU has it, with a portable loop elsewhere; the directory name
carries a hash of the CPU's feature flags, so a shared checkout never loads a library built for
another CPU). RoPE repeats its reference bit for bit, so the sources are compiled without contracting
a * b + c into fused multiply-adds (-ffp-contract=off).

`library()` returns the loaded op namespace (`torch.ops.tinyinfer_cpu`), or None -- after one warning
-- where there is no compiler or the build fails; the ops then keep their pure-PyTorch CPU paths.
TINYINFER_CPU_KERNELS=0 turns the library off (benchmarks compare both; tests check both).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from tinyinfer.extensions import BUILD_BASE, SOURCE_ROOT, host_cxx

CPU_DIR = SOURCE_ROOT / "cpu"
BUILD_ROOT = BUILD_BASE / "cpu"
LIBRARY_NAME = "tinyinfer_cpu"
# -fopenmp: at::parallel_for (the INT4 and Q8_0 matmuls split their outputs across torch's threads) is
# an OpenMP loop compiled into this library; without it the loop runs on one thread whatever
# torch.set_num_threads says. The library shares torch's OpenMP runtime (libgomp, already loaded).
PORTABLE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
NATIVE_FLAGS = PORTABLE_FLAGS + ["-march=native"]
ENV_SWITCH = "TINYINFER_CPU_KERNELS"


def sources() -> list[Path]:
    return [CPU_DIR / "ops.cpp"]


def fingerprint(flags: list[str]) -> str:
    """Hash of what the library depends on: sources, headers, flags, compiler, torch, Python."""
    h = hashlib.sha256()
    for path in sources() + sorted(CPU_DIR.glob("*.h")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps([flags, host_cxx(), torch.__version__, sys.version_info[:2]]).encode())
    return h.hexdigest()


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux /proc/cpuinfo), else the machine and processor names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build_directory(flags: Optional[list[str]] = None) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    what = _cpu_flags() + "\0" + " ".join(flags or NATIVE_FLAGS)
    return BUILD_ROOT / f"torch{torch_tag}-{py}-cpu{hashlib.sha256(what.encode()).hexdigest()[:12]}"


def compile_library(flags: Optional[list[str]] = None, name: str = LIBRARY_NAME,
                    verbose: bool = False) -> None:
    """Compile (incrementally) and load the library with `flags` (default: native). Raises
    RuntimeError / OSError / ImportError with the compiler's output when that fails. `name` and
    -DTINYINFER_CPU_LIB=<name> let a second build (tests: the portable one) load beside the first."""
    os.environ["CXX"] = host_cxx()
    flags = list(flags or NATIVE_FLAGS) + [f"-DTINYINFER_CPU_LIB={name}"]
    directory = build_directory(flags)
    stamp = directory / "stamp.json"
    built_from = fingerprint(flags)
    try:                                  # built before: load it without asking ninja (~1 s saved)
        record = json.loads(stamp.read_text())
        if record["fingerprint"] == built_from and Path(record["library"]).is_file():
            torch.ops.load_library(record["library"])
            return
    except (OSError, ValueError, KeyError):
        pass
    directory.mkdir(parents=True, exist_ok=True)
    import torch.utils.cpp_extension as cpp_extension
    # The one slow first start: say so, rather than let it pass as the model's own time.
    print(f"tinyinfer: building the C++ CPU kernels for this CPU (once per machine and torch version, "
          f"~20 s) into {directory} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cpp_extension.load(name=name, sources=[str(s) for s in sources()], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"],
                       extra_include_paths=[str(CPU_DIR)], build_directory=str(directory),
                       is_python_module=False, verbose=verbose)
    library = max(directory.glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
    stamp.write_text(json.dumps({"fingerprint": built_from, "library": str(library)}) + "\n")
    print(f"tinyinfer: C++ CPU kernels built in {time.perf_counter() - start:.1f} s", file=sys.stderr,
          flush=True)


@functools.cache
def _load() -> tuple[Any, str]:
    """(torch.ops.tinyinfer_cpu or None, why it is None). Tried once per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None, f"{ENV_SWITCH}=0"
    if shutil.which(host_cxx()) is None and not Path(host_cxx()).is_file():
        reason = f"no C++ compiler ({host_cxx()}) to build the CPU kernels"
    else:
        try:
            compile_library()
            return getattr(torch.ops, LIBRARY_NAME), ""
        except (RuntimeError, OSError, ImportError) as err:
            lines = ([ln for ln in str(err).splitlines() if "error:" in ln]
                     or [ln for ln in str(err).splitlines() if "error" in ln.lower()] or [""])
            reason = f"building the CPU kernels failed: {lines[0].strip() or type(err).__name__}"
    warnings.warn(f"tinyinfer: {reason}; the CPU ops use their pure-PyTorch paths (slower for small "
                  "models)", RuntimeWarning, stacklevel=3)
    return None, reason


def library() -> Any:
    """The CPU kernel library (`torch.ops.tinyinfer_cpu`), or None where it cannot be built."""
    return _load()[0]
