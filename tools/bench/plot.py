"""Plots of bench results, drawn with matplotlib's headless Agg backend: one module for every bench.

A bench that draws its results defines `figure(results: dict) -> Figure`, plain data (panels of named
series, no matplotlib), built from the same dict it returns and writes with `--json`. Then

    python -m tools.bench NAME --plot PATH.png       # run the bench, draw its figure
    python -m tools.bench.plot RESULT.json PATH.png  # draw it again from a recorded result

render() is the only code that imports matplotlib (the `plot` extra), so a bench run without --plot
never loads it. Each figure is titled with the machine (CPU model or GPU name), commit and date of
the result; each panel's axes carry their units; every figure is PANEL_PX wide per panel, HEIGHT_PX
high (fixed, so the README's images keep their size from one regeneration to the next).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

PANEL_PX, HEIGHT_PX, DPI = 560, 440, 100
MARKERS = "osD^vP*X"


@dataclass
class Series:
    """One named curve (or set of bars): y[i] drawn at x[i]. x holds numbers, or category names for a
    bar panel. dashed: the same colour as the previous series, drawn dashed with hollow markers (a
    predicted beside a measured curve, a p99 beside a p50)."""
    label: str
    x: list
    y: list
    dashed: bool = False
    point_labels: list[str] | None = None     # a short note beside each point (e.g. "k=2")


@dataclass
class Panel:
    """One axes: a line panel (numeric x) or, with bars=True, grouped bars over categories."""
    xlabel: str
    ylabel: str
    series: list[Series]
    title: str = ""
    bars: bool = False
    xlog: bool = False
    ylog: bool = False
    hline: float | None = None        # a reference level (speed-up 1, the copy bandwidth), dotted
    hline_label: str = ""


@dataclass
class Figure:
    title: str
    panels: list[Panel] = field(default_factory=list)


ENGINES = {"tinyinfer": "tinyinfer", "hf": "HF generate()", "llamacpp": "llama.cpp", "vllm": "vLLM"}


def engine_series(rows: list[dict], x: str, suffix: str = "_tok_s") -> list[Series]:
    """One series per engine from rows holding "<engine><suffix>" columns (any number of engines: a bench
    that measures one more adds its column), at x = row[x]; cells that are not numbers ("n/a") are left
    out."""
    engines = dict.fromkeys(k[:-len(suffix)] for r in rows for k in r if k.endswith(suffix))
    out = []
    for e in engines:
        points = [(r[x], r[e + suffix]) for r in rows if isinstance(r.get(e + suffix), (int, float))]
        if points:
            out.append(Series(ENGINES.get(e, e), [p[0] for p in points], [p[1] for p in points]))
    return out


def subtitle(result: dict) -> str:
    """Machine, commit and date of a bench's JSON (tools.bench.common.envelope)."""
    machine = result.get("machine") or result.get("device", "unknown machine")
    load = result.get("loadavg")
    if isinstance(load, (list, tuple)) and load:
        machine += f", load average {float(load[0]):.1f}"
    elif isinstance(load, str) and load:
        machine += f", load average {load.split()[0]}"
    date = str(result.get("time", "")).split(" ")[0] or "undated"
    return f"{machine} - commit {result.get('commit', 'unknown')} - {date}"


def size_px(fig: Figure) -> tuple[int, int]:
    return PANEL_PX * len(fig.panels), HEIGHT_PX


def _draw_lines(ax, panel: Panel) -> None:
    colour = None
    for i, s in enumerate(panel.series):
        if not s.dashed or colour is None:
            colour = f"C{i % 10}"
        ax.plot(s.x, s.y, linestyle="--" if s.dashed else "-", marker=MARKERS[i % len(MARKERS)],
                color=colour, markerfacecolor="none" if s.dashed else colour, label=s.label)
        for x, y, note in zip(s.x, s.y, s.point_labels or []):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    if panel.xlog:
        ax.set_xscale("log", base=2)
        ticks = sorted({x for s in panel.series for x in s.x})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def _draw_bars(ax, panel: Panel) -> None:
    categories: list = []
    for s in panel.series:
        categories += [c for c in s.x if c not in categories]
    # each category's bars side by side, centred on it (a category only one series has: one wide bar)
    present = {c: [i for i, s in enumerate(panel.series) if c in s.x] for c in categories}
    width = 0.8 / max(len(v) for v in present.values())
    for i, s in enumerate(panel.series):
        xs = [categories.index(c) + (present[c].index(i) - (len(present[c]) - 1) / 2) * width for c in s.x]
        bars = ax.bar(xs, s.y, width, label=s.label, color=f"C{i % 10}",
                      hatch="//" if s.dashed else None)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=20 if
                  sum(len(str(c)) for c in categories) > 40 else 0, ha="right" if
                  sum(len(str(c)) for c in categories) > 40 else "center", fontsize=8)


def render(fig: Figure, result: dict, path: str | Path) -> Path:
    """Draw fig (titled with result's machine, commit and date) into the PNG at path."""
    if not fig.panels:
        raise ValueError(f"{fig.title}: nothing to plot (the result has no rows for any panel)")
    import matplotlib
    matplotlib.use("Agg")                       # headless: no display, same pixels everywhere
    import matplotlib.pyplot as plt

    w, h = size_px(fig)
    canvas, axes = plt.subplots(1, len(fig.panels), figsize=(w / DPI, h / DPI), dpi=DPI,
                                squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], fig.panels):
        (_draw_bars if panel.bars else _draw_lines)(ax, panel)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="grey", linestyle=":", linewidth=1, label=panel.hline_label or None)
        if panel.ylog:
            ax.set_yscale("log")
        elif not any(v < 0 for s in panel.series for v in s.y):
            ax.set_ylim(bottom=0)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    width = 80 * len(fig.panels)             # characters that fit the figure's width at this font size
    canvas.suptitle("\n".join(textwrap.fill(line, width) for line in (fig.title, subtitle(result))), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.savefig(path, dpi=DPI, format="png")
    plt.close(canvas)
    return path


def plot_result(result: dict, path: str | Path) -> Path:
    """Draw a bench's JSON result with that bench's figure()."""
    from tools.bench import load_bench
    bench = str(result.get("bench", "")).split("#")[0]
    module = load_bench(bench) if bench else None
    if module is None or not callable(getattr(module, "figure", None)):
        raise SystemExit(f"cannot plot a result of bench {bench!r}: that bench defines no figure() "
                         "(see tools/bench/plot.py)")
    return render(module.figure(result), result, path)


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when --plot cannot be honoured."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.plot",
                                     description="Draw a recorded bench result (the JSON of --json) as a PNG.")
    parser.add_argument("result", help="a bench's JSON result")
    parser.add_argument("png", help="the PNG to write")
    args = parser.parse_args(argv)
    require_matplotlib()
    try:
        result = json.loads(Path(args.result).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{args.result}: not a readable JSON bench result ({err})")
    print(plot_result(result, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
