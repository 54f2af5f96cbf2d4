"""`python -m tinyinfer.extensions build` (what `make build` runs): compile the CUDA extension ahead of
time and show the compiler's resource report (ptxas registers, shared memory, spills per kernel).

    python -m tinyinfer.extensions build [--arch 90a]     # ahead-of-time build
    python -m tinyinfer.extensions info                   # toolkit, arch, sources, build directory

Works on a machine without a GPU (given nvcc and a CUDA build of torch): it compiles and imports the
module, so missing symbols show here, not on the GPU machine. The ptxas report (registers, spills,
shared memory per kernel) is kept in the build directory as resources.json (per source file, updated
by incremental builds) and printed after each build; a kernel that spills is flagged.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from tinyinfer import extensions


@contextlib.contextmanager
def _capture_fds(log: Path) -> Iterator[None]:
    """Send this process's stdout/stderr file descriptors (ninja, nvcc, g++ write there) to `log`."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = out.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> dict[str, dict[str, dict]]:
    """Per source file, per kernel: registers, spill stores/loads, stack frame and shared memory
    (bytes). Ninja prints each command line ("[2/5] nvcc ... -c /path/x.cu ...") before its output."""
    report: dict[str, dict[str, dict]] = {}
    source, current = "?", None
    for line in log.splitlines():
        if m := re.match(r"\[\d+/\d+\] .* -c (\S+\.cu)\b", line):
            source, current = Path(m[1]).name, None
        elif m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line):
            current = m[1]
            report.setdefault(source, {}).setdefault(current, {})
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                         r"(\d+) bytes spill loads", line)):
            report[source][current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            report[source][current].update(registers=int(m[1]), smem=int(smem[1]) if smem else 0)
    return {src: {k: r for k, r in kernels_.items() if "registers" in r} for src, kernels_ in report.items()}


def _print_report(resources: dict[str, dict[str, dict]], arch: str) -> None:
    print(f"ptxas resource report (sm_{arch}):")
    for source in sorted(resources):
        names = _demangle(sorted(resources[source]))
        for mangled, pretty in sorted(names.items(), key=lambda kv: kv[1]):
            r = resources[source][mangled]
            spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
            flag = "  <-- SPILLS: fewer live values or a smaller tile" if spills else ""
            print(f"  {source}: {pretty}: {r['registers']} regs, {r.get('smem', 0)} B smem, "
                  f"{r.get('stack', 0)} B stack, spill {r.get('spill_stores', 0)}/{r.get('spill_loads', 0)} B st/ld"
                  f"{flag}")


def _read_resources(directory: Path) -> dict[str, dict]:
    try:
        return json.loads((directory / "resources.json").read_text())
    except (OSError, ValueError):
        return {}


def build(arch: str) -> int:
    directory = extensions.build_directory(arch)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "build.log"
    print(f"tinyinfer: building CUDA extension for sm_{arch} with MAX_JOBS={os.environ.get('MAX_JOBS', os.cpu_count())}"
          f" -> {directory}", flush=True)
    start = time.perf_counter()
    if extensions.load_prebuilt(arch) is not None:
        # Also the path of a library brought back from an earlier gpu-check ($OUT/build/ext/...):
        # its stamp matches these sources, torch and arch, so there is nothing to compile.
        print("tinyinfer: prebuilt extension is up to date (stamp matches sources, torch, arch)")
        _print_report(_read_resources(directory), arch)
        return 0
    error = None
    try:
        with _capture_fds(log):  # straight to the log, so a killed build still leaves its output
            module = extensions.compile_extension(arch, verbose=True)
    except (RuntimeError, OSError, ImportError) as err:
        error = err
    text = log.read_text(errors="replace")
    if error is not None:
        with open(log, "a") as f:
            f.write(f"\n{error}\n")
        print(text[-20000:], file=sys.stderr)
        print(f"\ntinyinfer: BUILD FAILED for sm_{arch}: {str(error).splitlines()[0] if str(error) else error!r}\n"
              f"full log: {log}", file=sys.stderr)
        return 1
    # An incremental build reports only the files it recompiled: replace those, keep the rest, and
    # drop files that are no longer sources.
    current = {p.name for p in extensions.sources()}
    resources = {src: r for src, r in _read_resources(directory).items() if src in current and isinstance(r, dict)}
    resources.update(parse_ptxas(text))
    (directory / "resources.json").write_text(json.dumps(resources, indent=1) + "\n")
    for line in text.splitlines():
        if "warning" in line.lower() and "ptxas info" not in line:
            print("  " + line)
    _print_report(resources, arch)
    print(f"tinyinfer: built {Path(module.__file__).name} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def info(arch: str) -> int:
    home = extensions.find_cuda_home()
    print(f"CUDA toolkit : {home} (version {extensions._toolkit_version(home) if home else None})")
    print(f"torch        : {extensions.torch.__version__} (CUDA {extensions.torch.version.cuda})")
    print(f"target arch  : sm_{arch}")
    print(f"build dir    : {extensions.build_directory(arch)}")
    print(f"sources      : {', '.join(p.name for p in extensions.sources())}")
    cxx, nvcc = extensions.compile_flags(arch)
    print(f"c++ flags    : {' '.join(cxx)}\nnvcc flags   : {' '.join(nvcc)}")
    print(f"prebuilt ok  : {extensions.load_prebuilt(arch) is not None}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyinfer.extensions",
                                     description="Build or inspect tinyinfer's CUDA extension.")
    parser.add_argument("command", choices=["build", "info"], help="build: compile ahead of time; "
                        "info: show toolkit, arch, flags and whether a matching prebuilt module exists")
    parser.add_argument("--arch", default=None, help="compute capability to build for, e.g. 90a or 80 "
                        "(default: the visible GPU's own, else 90a)")
    args = parser.parse_args(argv)
    arch = args.arch or extensions.target_arch()
    return build(arch) if args.command == "build" else info(arch)


if __name__ == "__main__":
    sys.exit(main())
