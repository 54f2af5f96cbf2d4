"""copy: the two yardsticks for every memory-bound kernel, measured: device-to-device copy bandwidth
and read-only streaming bandwidth.

One copy of N bytes reads N and writes N; the figure is 2N / median time. The read-only stream is a
torch.sum over N bytes (N / median time): kernels that mostly read (attention, GEMV) compare with it.
On a GPU N = 1 GiB (far beyond L2); on a CPU 256 MiB, and the figures are only references for ratios
within the same run.
"""
from __future__ import annotations

import argparse

import torch

from tools.bench.common import GiB, copy_bandwidth, device_label, read_bandwidth, summary_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=int, default=None, help="bytes to copy, in MiB (default: 1024 on a "
                        "GPU, 256 on a CPU)")
    parser.add_argument("--runs", type=int, default=10, help="timed copies; the median is reported")


def run(args: argparse.Namespace, device: torch.device) -> dict:
    nbytes = args.mib << 20 if args.mib else None
    result = copy_bandwidth(device, nbytes=nbytes, runs=args.runs)
    if not result["copy_correct"]:
        raise SystemExit("copy bench: the destination does not equal the source")
    read = read_bandwidth(device, nbytes=nbytes, runs=args.runs)
    if not read["sum_correct"]:
        raise SystemExit("copy bench: the read-only stream's sum is wrong")
    print(f"{device_label(device)}")
    print(f"device-to-device copy of {result['bytes'] / GiB:.2f} GiB: median "
          f"{result['timing']['median_s'] * 1e3:.3f} ms -> {result['gbps']:.1f} GB/s (read + write)")
    print(f"read-only stream (sum) of {read['bytes'] / GiB:.2f} GiB: median "
          f"{read['timing']['median_s'] * 1e3:.3f} ms -> {read['gbps']:.1f} GB/s "
          f"({read['gbps'] / result['gbps']:.2f}x copy)")
    return {"copy": result, "read": read,
            "summary": [summary_row("copy bandwidth", result["gbps"], "GB/s"),
                        summary_row("read-only bandwidth", read["gbps"], "GB/s", vs_copy=read["gbps"] / result["gbps"])]}


def figure(results: dict):
    """The two yardsticks side by side, in GB/s."""
    from tools.bench.plot import Figure, Panel, Series
    size = f"{results['copy']['bytes'] / GiB:.2f} GiB"
    panel = Panel("stream", "GB/s", [Series("measured", ["copy (read + write)", "read-only (sum)"],
                                              [results["copy"]["gbps"], results["read"]["gbps"]])],
                  bars=True, title=f"{size} streamed, median of {results['copy']['timing']['runs']} runs")
    return Figure("bench copy: the bandwidth yardsticks", [panel])
