"""copy: measured device-to-device copy bandwidth, the yardstick for every memory-bound kernel.

One copy of N bytes reads N and writes N; the figure is 2N / median time. On a GPU N = 1 GiB (far
beyond L2); on a CPU 256 MiB, and the figure is only a reference for ratios within the same run.
"""
from __future__ import annotations

import argparse

import torch

from tinyinfer.bench.common import GiB, copy_bandwidth, device_label, summary_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=int, default=None, help="bytes to copy, in MiB (default: 1024 on a "
                        "GPU, 256 on a CPU)")
    parser.add_argument("--runs", type=int, default=10, help="timed copies; the median is reported")


def run(args: argparse.Namespace, device: torch.device) -> dict:
    result = copy_bandwidth(device, nbytes=args.mib << 20 if args.mib else None, runs=args.runs)
    if not result["copy_correct"]:
        raise SystemExit("copy bench: the destination does not equal the source")
    print(f"{device_label(device)}")
    print(f"device-to-device copy of {result['bytes'] / GiB:.2f} GiB: median "
          f"{result['timing']['median_s'] * 1e3:.3f} ms -> {result['gbps']:.1f} GB/s (read + write)")
    return {"copy": result, "summary": [summary_row("copy bandwidth", result["gbps"], "GB/s")]}
