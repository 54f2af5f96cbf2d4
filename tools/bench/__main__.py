"""`python -m tools.bench <name> ...`: one subcommand per bench module (see __init__.py)."""
from __future__ import annotations

import argparse
import sys

from tinyinfer.config.help import HelpFormatter
from tools.bench import bench_names, load_bench
from tools.bench.common import envelope, resolve_device, set_quick, write_json


class _Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The bench's docstring as written, and every option's default."""


def first_sentence(doc: str) -> str:
    """The docstring's first sentence, whole (its first line may stop mid-sentence)."""
    text = " ".join(doc.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


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
        p = sub.add_parser(name, help=first_sentence(module.__doc__ or name), description=module.__doc__,
                           formatter_class=_Help)
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
        if callable(getattr(module, "figure", None)):
            p.add_argument("--plot", default=None, metavar="PATH.png",
                           help="also draw the results into this PNG (needs matplotlib: the plot extra)")
        p.add_argument("--quick", action="store_true",
                       help="a dry run (the test suite's): smallest sizes, one timed run; figures mean nothing")
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
    set_quick(args.quick)
    results = envelope(args.bench, device, args.module.run(args, device))
    write_json(args.json, results)
    if getattr(args, "plot", None):
        from tools.bench.plot import plot_result
        print(f"plot: {plot_result(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
