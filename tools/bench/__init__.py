"""Benchmarks: `python -m tools.bench <name> [--device cuda|cpu] [--json PATH] ...`.

Every module tools/bench/<name>.py (other than common.py) is a subcommand -- drop a file in,
nothing to register. A bench module defines:

    def add_arguments(parser: argparse.ArgumentParser) -> None   # its own options
    def run(args: argparse.Namespace, device: torch.device) -> dict
        # prints its human-readable figures, returns JSON-able results; put headline figures in
        # results["summary"] as common.summary_row(...) dicts (gpu-check's final table shows them)

and optionally GPU_CHECK_ARGS: list[list[str]] -- the argument lists `make gpu-check` runs it with
(default: once, with no extra arguments), and optionally figure(results) -> tools.bench.plot.Figure
(its results drawn: the bench then takes --plot PATH.png; import plot inside figure(), so a run without
--plot loads no plotting code). `--device` and `--json` are added for every bench; do not add them
again. `make gpu-check` runs `copy` first, then the other benches by name, then `e2e` last.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

NOT_BENCHES = {"common", "__main__", "plot", "spec_workloads", "divergence",   # spec_workloads: bench spec --workloads
               "llamacpp_logits"}                                      # bench quality's llama.cpp row


def bench_names() -> list[str]:
    """Every bench module, in the order gpu-check runs them: copy, the kernel benches, e2e."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_BENCHES)
    first = [n for n in ("copy",) if n in names]
    last = [n for n in ("e2e",) if n in names]
    return first + [n for n in names if n not in first + last] + last


def load_bench(name: str) -> ModuleType:
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [f for f in ("add_arguments", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"tools/bench/{name}.py is not a bench: it lacks {', '.join(missing)}() "
                        "(see tools/bench/__init__.py)")
    return module
