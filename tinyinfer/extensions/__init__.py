"""The build of the CUDA kernels: compile `cuda/` into one extension and load it.

The hand-written kernels in `cuda/` are compiled into one extension through `torch.utils.cpp_extension`
(PyTorch's C++/CUDA extension mechanism); `tinyinfer/ops/cuda.py` registers them as the `cuda` impl of
their ops, so `ops.store_kv(...)` runs the kernel on a GPU and the reference elsewhere.

- One list of sources (`sources()`) and flags (`CXX_FLAGS`, `NVCC_FLAGS`); builds target the
  device's own architecture only (`target_arch()`; sm_90a when no GPU is visible), which keeps
  compiles short.
- `make build` (`python -m tinyinfer.extensions build`) compiles ahead of time, also on a machine
  without a GPU, into `build/ext/<torch>-<python>-sm_<arch>/` with a stamp of what was built.
- `extension()` loads that prebuilt module when its stamp matches the current sources, torch and
  device; otherwise, on a CUDA device, compiles it just in time (ninja, cached, one line on stderr);
  otherwise returns None -- with one clear warning on a GPU machine, where the slow path is a surprise.

Adding a kernel: see tinyinfer/ops/cuda.py and the top of cuda/bindings.cpp.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # tinyinfer/
REPO_ROOT = PACKAGE_DIR.parent
# A source checkout (and an editable install) has cuda/ and cpu/ beside the package and builds into its
# build/. A plain `pip install .` carries them inside the package, as tinyinfer/_csrc/{cuda,cpu}
# (setup.py's package_data), and builds into the user's cache, since site-packages may not be writable.
IN_CHECKOUT = (REPO_ROOT / "cpu" / "ops.cpp").is_file() and (REPO_ROOT / "cuda" / "bindings.cpp").is_file()
SOURCE_ROOT = REPO_ROOT if IN_CHECKOUT else PACKAGE_DIR / "_csrc"
BUILD_BASE = (REPO_ROOT / "build" if IN_CHECKOUT else
              Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyinfer" / "build")
CUDA_DIR = SOURCE_ROOT / "cuda"
BUILD_ROOT = BUILD_BASE / "ext"
EXTENSION_NAME = "tinyinfer_cuda"

CXX_FLAGS = ["-O3"]
# -lineinfo maps sanitizer/profiler reports to source lines at no run-time cost; -Xptxas=-v makes the
# compiler print registers, spills and shared memory per kernel (`make build` shows that report).
# No --use_fast_math: kernels that want fast intrinsics (__expf) say so where they use them.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-v"]

def sources() -> list[Path]:
    # bindings.cpp first: torch's headers make it the slowest single compile, so with few cores
    # ninja should start it before the kernels.
    return [CUDA_DIR / "bindings.cpp"] + sorted(CUDA_DIR.glob("*.cu"))


def headers() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cuh")) + sorted(CUDA_DIR.glob("*.h"))


# ----------------------------------------------------------------------------------------------
# Toolchain: where CUDA lives, which arch to build for
# ----------------------------------------------------------------------------------------------

def _toolkit_version(home: Path) -> Optional[str]:
    """"13.0" from the toolkit's cuda.h (`#define CUDA_VERSION 13000`), or None."""
    try:
        m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", (home / "include" / "cuda.h").read_text(errors="replace"))
    except OSError:
        return None
    return f"{int(m[1]) // 1000}.{int(m[1]) % 1000 // 10}" if m else None


def _is_toolkit(home: Path) -> bool:
    nvcc = home / "bin" / "nvcc"
    if not (nvcc.is_file() and (home / "include" / "cuda.h").is_file()):
        return False
    with open(nvcc, "rb") as f:
        return f.read(2) != b"#!"  # a wrapper script is not the toolkit's own compiler


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit to compile with, preferring one whose major version matches torch's CUDA.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script (as in
    /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc), so resolve the real compiler."""
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        nvcc = Path(directory or ".") / "nvcc"
        if not nvcc.is_file():
            continue
        nvcc = nvcc.resolve()
        candidates.append(nvcc.parent.parent)
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: follow the absolute nvcc path it runs
            candidates += [Path(m.decode()).resolve().parent.parent
                           for m in re.findall(rb"(/[^\s\"']*/bin/nvcc)\b", head)]
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    candidates += [Path("/opt/cuda")] + sorted((Path(torch.__file__).parent.parent / "nvidia").glob("cu*"))
    found = [c.resolve() for c in candidates if _is_toolkit(c)]
    major = (torch.version.cuda or "").split(".")[0]
    matching = [c for c in found if (_toolkit_version(c) or "").split(".")[0] == major]
    return (matching or found or [None])[0]


def target_arch() -> str:
    """Compute capability to build for: the visible device's own ("90a" on Hopper), else "90a"."""
    if not torch.cuda.is_available():
        return "90a"
    major, minor = torch.cuda.get_device_capability()
    # The "a" variants (sm_90a, sm_100a, ...) unlock arch-specific instructions; the code then runs only
    # on that exact arch, which is what a build for the device in front of us wants.
    return f"{major}{minor}{'a' if major >= 9 else ''}"


def build_directory(arch: str) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return BUILD_ROOT / f"torch{torch_tag}-{py}-sm_{arch}"


def _nvidia_wheel_includes() -> list[Path]:
    # Headers the toolkit may lack (cusparse.h, cublas_v2.h, ...) ship in torch's nvidia wheels.
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(p for p in site.glob("*/include") if p.is_dir())


def compile_flags(arch: str) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) for one arch. The wheel headers go *after* the toolkit's (-idirafter),
    so they only fill gaps; only bindings.cpp (g++) needs them, the .cu files include no torch."""
    # Match torch's C++ ABI explicitly rather than trust the host compiler's default: TORCH_CHECK
    # messages (std::string) cross into libc10.
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    cxx = CXX_FLAGS + abi + [f"-idirafter{p}" for p in _nvidia_wheel_includes()]
    nvcc = NVCC_FLAGS + abi + [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    return cxx, nvcc


def fingerprint(arch: str) -> str:
    """Hash of everything the built module depends on: sources, headers, flags, torch, Python."""
    h = hashlib.sha256()
    for path in sources() + headers():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    meta = [compile_flags(arch), host_cxx(), torch.__version__, torch.version.cuda, sys.version_info[:2],
            EXTENSION_NAME]
    h.update(json.dumps(meta, default=str).encode())
    return h.hexdigest()


# The host C++ compiler that compiles bindings.cpp and links the module. Prefer the distribution's own
# g++: a toolchain whose driver links libstdc++ statically (seen on a GPU image: a `c++` on PATH that
# wraps g++ with its own -B library path) puts a second, uninitialised copy of the C++ streams in the
# module, and the first TORCH_CHECK that formats its message crashes the process (seen in
# std::ostream::_M_insert inside the module). $CXX, when set, wins.
SYSTEM_CXX = "/usr/bin/g++"


def host_cxx() -> str:
    return os.environ.get("CXX") or (SYSTEM_CXX if Path(SYSTEM_CXX).is_file() else "c++")


def _cpp_extension() -> Any:
    """torch.utils.cpp_extension, told where the real toolkit is before it guesses."""
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = str(home)  # read by cpp_extension at import
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # ninja's -j
    os.environ["CXX"] = host_cxx()             # read by cpp_extension when it builds
    import torch.utils.cpp_extension as cpp_extension
    if home is not None:
        cpp_extension.CUDA_HOME = str(home)  # in case it was imported earlier with the wrong guess
    return cpp_extension


def compile_extension(arch: str, verbose: bool = False) -> Any:
    """Compile (incrementally, with ninja) and import the extension for `arch`; write its stamp.
    Raises RuntimeError (with the compiler output) or OSError/ImportError when that fails."""
    cpp_extension = _cpp_extension()
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (looked at $CUDA_HOME, nvcc on PATH, /usr/local/cuda*); "
                           "install the CUDA toolkit matching torch.version.cuda=" + str(torch.version.cuda))
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    directory = build_directory(arch)
    directory.mkdir(parents=True, exist_ok=True)
    cxx, nvcc = compile_flags(arch)
    built_from = fingerprint(arch)  # before compiling: sources edited meanwhile must not match the stamp
    module = cpp_extension.load(name=EXTENSION_NAME, sources=[str(s) for s in sources()],
                                extra_cflags=cxx, extra_cuda_cflags=nvcc,
                                extra_include_paths=[str(CUDA_DIR)], build_directory=str(directory),
                                verbose=verbose, with_cuda=True)
    stamp = {"fingerprint": built_from, "arch": f"sm_{arch}", "torch": torch.__version__,
             "cuda": torch.version.cuda, "python": sys.version.split()[0],
             "cuda_home": cpp_extension.CUDA_HOME, "library": Path(module.__file__).name}
    (directory / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return module


def load_prebuilt(arch: str, strict: bool = False) -> Any:
    """The module `make build` left for this arch, if its stamp matches the current build; else None.
    An up-to-date module that does not import (a missing symbol) is None too, or, with `strict`, the
    ImportError (tests: a broken build must fail, not skip)."""
    directory = build_directory(arch)
    try:
        stamp = json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    library = directory / str(stamp.get("library", ""))
    if stamp.get("fingerprint") != fingerprint(arch) or not library.is_file():
        return None
    import importlib.util
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, library)
    try:                      # an extension module is dlopen'ed (symbols resolved) in module_from_spec
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        if strict:
            raise
        return None  # e.g. built against another torch's symbols: compile again instead
    return module


@functools.cache
def _load() -> tuple[Any, str]:
    """(extension module or None, why it is None). Tried once per process."""
    arch = target_arch()
    module = load_prebuilt(arch)
    if module is not None:
        return module, ""
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible, so no kernel would run (CPU ops use the references)"
    print("tinyinfer: compiling CUDA kernels (first run only)...", file=sys.stderr, flush=True)
    try:
        return compile_extension(arch), ""
    except (RuntimeError, OSError, ImportError) as err:
        lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()
        reason = f"building the CUDA kernels failed: {lines[0] if lines else type(err).__name__}"
        log = build_directory(arch) / "jit-error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(str(err))
        warnings.warn(f"tinyinfer: {reason} (full output in {log}; `make build` shows it too). "
                      "Falling back to the slow pure-PyTorch reference ops.", RuntimeWarning, stacklevel=3)
        return None, reason


def extension() -> Any:
    """The loaded CUDA extension module, or None when kernels cannot run here (see module docstring)."""
    return _load()[0]


def require_extension() -> Any:
    """The extension, or a RuntimeError saying why there is none (for tests and gpu-check)."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"tinyinfer CUDA extension unavailable: {reason}")
    return module
