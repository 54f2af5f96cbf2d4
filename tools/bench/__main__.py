"""`python -m tools.bench <name> ...`: one subcommand per bench module (see __init__.py)."""
from __future__ import annotations

import argparse
import sys

from tools.bench import bench_names, load_bench
from tools.bench.common import envelope, resolve_device, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description="tinyinfer benchmarks. GPU figures are absolute for that "
                                     "card; CPU figures are only ratios within one run.")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in bench_names():
        try:
            module = load_bench(name)
        except (ImportError, TypeError) as err:  # one broken bench must not hide the others
            sub.add_parser(name, help=f"(unavailable: {err})")
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
        if callable(getattr(module, "figure", None)):
            p.add_argument("--plot", default=None, metavar="PATH.png",
                           help="also draw the results into this PNG (needs matplotlib: the plot extra)")
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "module", None) is None:
        load_bench(args.bench)  # raises the import error that made it unavailable
    if getattr(args, "plot", None):
        from tools.bench.plot import require_matplotlib
        require_matplotlib()
    device = resolve_device(args.device)
    results = envelope(args.bench, device, args.module.run(args, device))
    write_json(args.json, results)
    if getattr(args, "plot", None):
        from tools.bench.plot import plot_result
        print(f"plot: {plot_result(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
