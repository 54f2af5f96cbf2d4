"""`make gpu-tune`: pick the kernel configurations to ship by timing every variant on the GPU in front of it.

1. build: every variant of the tuning space (cuda/tune/*.cu compiled once per configuration with -D
   macros, in parallel, no torch headers) linked into one library, loaded with ctypes; registers and
   spills per variant from ptxas;
2. check: each variant's output against a torch reference on fresh random data (INT4: the weight unpacked
   from the kernel layout's definition; attention: float64 softmax over the gathered keys);
3. time: L2-rotated input sets (> 4x L2), one pass over every set per CUDA-graph replay, median of runs;
   INT4 over one Llama-3-8B decoder layer (byte-weighted), attention on the benchmark cases; then the split
   fill (and the attention's minimum partition) for the best tile;
4. report: one table per kernel, the chosen configuration as cuda/tuned.cuh lines (copy them there with
   the card's name), everything as JSON under $OUT (else gpu-tune-out/).
Together with `make gpu-check` it must fit in 8 minutes: ~20-40 s to build 32 variants on 16 cores
(78 s on 2 cores), ~1 min to time; --budget-s (default 150 s from the start) stops timing early and the
table says which variants were not timed. Without a GPU it says so and exits with status 2;
--build-only compiles the variants anywhere nvcc is installed and reports registers and spills.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tinyinfer.extensions import CUDA_DIR, REPO_ROOT, build_directory, compile_flags, find_cuda_home, host_cxx, target_arch
from tools.gpu_tune_sweeps import (ATTN_TILES, INT4_TILES, attn_name, copy_gbps, int4_name, tune_attention,
                                   tune_int4)

INT4_NAMES = {1: "Int4M8", 2: "Int4M16", 4: "Int4M32", 8: "Int4M64"}


def variants() -> list[tuple[str, str, dict]]:
    """(entry-point name, source in cuda/tune/, -D macros) of every variant of the tuning space."""
    out = [(int4_name(ms, t), "int4_variant.cu", dict(TI_MS=ms, TI_WN=t[0], TI_WK=t[1], TI_R=t[2], TI_KPS=t[3],
                                                       TI_STAGES=t[4]))
           for ms, tiles in INT4_TILES.items() for t in tiles]
    out += [(attn_name(mt, t), "attention_variant.cu", dict(TI_MT=mt, TI_W=t[0], TI_TK=t[1], TI_STAGES=t[2]))
            for mt in (1, 4) for t in ATTN_TILES]
    return out


def build_library(log_dir: Path) -> tuple[ctypes.CDLL, dict]:
    """Compile every variant (one nvcc per variant, all cores) and link them into one shared library."""
    nvcc, arch = find_cuda_home() / "bin" / "nvcc", target_arch()
    directory = build_directory(arch) / "tune"
    directory.mkdir(parents=True, exist_ok=True)
    flags = compile_flags(arch)[1] + ["-std=c++17", "-Xcompiler", "-fPIC", "-ccbin", host_cxx(), f"-I{CUDA_DIR}"]

    def compile_one(v: tuple[str, str, dict]) -> tuple[str, int, str]:
        name, src, defs = v
        cmd = [str(nvcc), *flags, f"-DTI_NAME={name}", *[f"-D{k}={x}" for k, x in defs.items()], "-c",
               str(CUDA_DIR / "tune" / src), "-o", str(directory / f"{name}.o")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        return name, run.returncode, run.stdout + run.stderr

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, variants()))
    (log_dir / "tune-build.log").write_text("\n".join(f"=== {n} (exit {c})\n{text}" for n, c, text in results))
    failed = [n for n, c, _ in results if c != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} variant(s) failed to compile, e.g. {failed[0]}; see tune-build.log")
    resources = {}
    for name, _, text in results:  # the variant's kernels: the largest register count, any spill
        regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
        spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
        resources[name] = {"regs": max(regs, default=0), "spill_bytes": spills}
    lib = directory / "libtinyinfer_tune.so"
    link = subprocess.run([str(nvcc), "-shared", "-ccbin", host_cxx(), "-o", str(lib),
                           *[str(directory / f"{n}.o") for n, _, _ in results]], capture_output=True, text=True)
    if link.returncode != 0:
        raise RuntimeError(f"linking the tuning library failed:\n{link.stderr[-3000:]}")
    return ctypes.CDLL(str(lib)), resources




def table(rows: list[dict], columns: list[str]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(columns)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in [columns] + cells)


def tuned_lines(int4: dict, attn: dict, device: str) -> list[str]:
    """The configuration to write into cuda/tuned.cuh (with the card's name)."""
    lines = [f"// Measured on: {device} (make gpu-tune, {time.strftime('%Y-%m-%d')})"]
    for ms, r in int4.items():
        if r["chosen"]:
            lines.append(f"using {INT4_NAMES[ms]} = Int4Tile<{', '.join(map(str, r['chosen']['tile']))}>;")
    fills = [r["fill"] for r in int4.values() if r["fill"] is not None]
    if fills:  # one fill for all classes in tuned.cuh: the one most classes chose
        lines.append(f"constexpr float kInt4SplitFill = {max(set(fills), key=fills.count)}f;")
    if attn["chosen"]:
        c = attn["chosen"]
        lines += [f"using Attn128 = AttnTile<{', '.join(map(str, c['tile']))}>;",
                  f"constexpr float kAttnSplitFill = {c['fill']}f;", f"constexpr int kAttnMinChunk = {c['min_chunk']};"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_tune", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=150, help="stop timing new variants after this long")
    parser.add_argument("--build-only", action="store_true", help="compile the variants and print registers and "
                        "spills; needs nvcc, not a GPU")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or REPO_ROOT / "gpu-tune-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        _, resources = build_library(out)
        print(table([{"variant": k, **v} for k, v in resources.items()], ["variant", "regs", "spill_bytes"]))
        return 1 if any(v["spill_bytes"] for v in resources.values()) else 0
    if not torch.cuda.is_available() or find_cuda_home() is None:
        msg = ("gpu-tune: no CUDA GPU (or no CUDA toolkit) is visible here (torch.cuda.is_available() = "
               f"{torch.cuda.is_available()}); it times kernels on a GPU machine and ran nothing.")
        (out / "gpu-tune.json").write_text(json.dumps({"result": "NO GPU", "message": msg}) + "\n")
        print(msg, file=sys.stderr)
        return 2
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    device = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    print(f"[gpu-tune] {device}; building {len(variants())} variants on {os.cpu_count()} cores", flush=True)
    lib, resources = build_library(out)
    print(f"[gpu-tune] built in {time.perf_counter() - start:.0f} s", flush=True)
    deadline = start + args.budget_s
    copy = copy_gbps()
    int4 = tune_int4(lib, copy, deadline)
    attn = tune_attention(lib, copy, deadline)
    for ms, c in int4.items():
        for r in c["rows"] + c["fill_sweep"]:
            r.update(resources.get(int4_name(ms, r["tile"]), {}))
    for r in attn["rows"] + attn["sweep"]:
        r["regs"] = max(resources.get(attn_name(mt, r["tile"]), {}).get("regs", 0) for mt in (1, 4))
    lines = tuned_lines(int4, attn, device)
    report = {"device": device, "copy_gbps": copy, "seconds": time.perf_counter() - start, "resources": resources,
              "int4": {str(k): v for k, v in int4.items()}, "attention": attn, "tuned_cuh": lines}
    (out / "gpu-tune.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\n=== gpu-tune on {device}; copy bandwidth {copy:.0f} GB/s ===")
    for ms, c in int4.items():
        print(f"\nINT4 M = {c['M']} (Llama-3-8B layer, bf16 x, g128), chosen fill {c['fill']}")
        print(table(c["rows"] + c["fill_sweep"], ["tile", "fill", "regs", "spill_bytes", "error", "layer_us",
                                                  "vs_copy", "note"]))
    print("\nattention (bf16, D 128, GQA 32/8)")
    cases = [k for k in (attn["rows"][0] if attn["rows"] else {}) if k.endswith(" us") or k.endswith("vs_copy")]
    print(table(attn["rows"] + attn["sweep"], ["tile", "fill", "min_chunk", "regs", "error", "total_us", *cases, "note"]))
    print("\nchosen configuration (copy into cuda/tuned.cuh):\n  " + "\n  ".join(lines))
    print(f"\n[gpu-tune] done in {time.perf_counter() - start:.0f} s -- JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
