"""Bench plots (tools/bench/plot.py): every bench figure renders from a small recorded result on the CPU
(headless Agg) into a valid PNG of the expected size, titled with the machine, commit and date; --plot
works end to end; and without --plot no plotting code is imported."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import bench_names, load_bench
from tools.bench.__main__ import main

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "bench"
# bench -> panels its figure draws from the fixture (each panel PANEL_PX wide)
PANELS = {"quality": 1, "serve": 3, "hf": 2, "prefix": 2, "spec": 1, "int4": 2, "attention": 1, "copy": 1}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature and the chunk's type."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: first chunk is {kind!r}, not IHDR"
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path}: no IEND chunk (truncated)"
    return struct.unpack(">II", data[16:24])


def test_every_plotting_bench_has_a_fixture():
    plotting = {n for n in bench_names() if callable(getattr(load_bench(n), "figure", None))}
    assert plotting >= set(PANELS), f"these benches lost their figure(): {set(PANELS) - plotting}"
    assert plotting <= {p.stem for p in FIXTURES.glob("*.json")}, "a bench draws a figure no test renders"


@pytest.mark.parametrize("bench", sorted(PANELS))
def test_figure_renders_from_a_recorded_result(bench, tmp_path):
    pytest.importorskip("matplotlib")
    from tools.bench.plot import HEIGHT_PX, PANEL_PX, plot_result
    result = json.loads((FIXTURES / f"{bench}.json").read_text())
    fig = load_bench(bench).figure(result)
    assert len(fig.panels) == PANELS[bench]
    for panel in fig.panels:                             # every axis labelled, with a unit where one is due
        assert panel.xlabel and panel.ylabel and panel.series
        assert all(len(s.x) == len(s.y) > 0 for s in panel.series)
    out = plot_result(result, tmp_path / f"{bench}.png")
    assert png_size(out) == (PANEL_PX * PANELS[bench], HEIGHT_PX)


def test_title_names_machine_commit_and_date():
    from tools.bench.plot import subtitle
    result = json.loads((FIXTURES / "int4.json").read_text())
    assert subtitle(result) == "NVIDIA H200 (test fixture), load average 1.0 - commit fixture - 2026-12-07"
    old = {"device": "CPU (x86_64, 2 cores)", "commit": "abc1234", "time": "2026-11-26 10:00:00"}
    assert subtitle(old) == "CPU (x86_64, 2 cores) - commit abc1234 - 2026-11-26"   # JSON from before machine
    assert "load average 3.10 - " in subtitle({**old, "loadavg": "3.10 2.00 1.50"})   # a bench's own string


def test_hf_figure_draws_one_curve_per_engine_column():
    """A bench that adds another engine's tokens/s column (llama.cpp) gets its curve without new code."""
    result = json.loads((FIXTURES / "hf.json").read_text())
    for row in result["rows"]:
        row["llamacpp_tok_s"] = row["hf_tok_s"] * 2
    labels = [s.label for s in load_bench("hf").figure(result).panels[0].series]
    assert labels == ["tinyinfer", "HF generate()", "llama.cpp"]


def test_engine_series_takes_any_number_of_engines_and_skips_missing_cells():
    """bench llamacpp's rows: named tests, llama.cpp's cell "n/a" where llama-bench did not run it."""
    from tools.bench.plot import engine_series
    rows = [{"figure": "decode b1", "tinyinfer_tok_s": 40.0, "llamacpp_tok_s": 55.0, "ratio": 0.73},
            {"figure": "prefill 500", "tinyinfer_tok_s": 300.0, "llamacpp_tok_s": "n/a"}]
    series = engine_series(rows, "figure")
    assert [(s.label, s.x, s.y) for s in series] == [
        ("tinyinfer", ["decode b1", "prefill 500"], [40.0, 300.0]), ("llama.cpp", ["decode b1"], [55.0])]


def test_plot_flag_runs_the_bench_and_draws_it(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tools.bench.plot import HEIGHT_PX, PANEL_PX
    png, js = tmp_path / "copy.png", tmp_path / "copy.json"
    assert main(["copy", "--device", "cpu", "--mib", "4", "--runs", "2", "--json", str(js), "--plot", str(png)]) == 0
    assert png_size(png) == (PANEL_PX, HEIGHT_PX)
    recorded = json.loads(js.read_text())
    assert recorded["machine"] and recorded["commit"] and f"plot: {png}" in capsys.readouterr().out
    again = tmp_path / "again.png"                       # the same figure, redrawn from the JSON
    assert subprocess.run([sys.executable, "-m", "tools.bench.plot", str(js), str(again)], cwd=REPO,
                          capture_output=True).returncode == 0
    assert png_size(again) == (PANEL_PX, HEIGHT_PX)


def test_replot_refuses_a_bench_without_a_figure(tmp_path):
    from tools.bench.plot import plot_result
    with pytest.raises(SystemExit, match="bench 'store_kv': that bench defines no figure"):
        plot_result({"bench": "store_kv"}, tmp_path / "x.png")


def test_no_plotting_code_is_imported_without_plot(tmp_path):
    code = ("import sys; from tools.bench.__main__ import main; "
            f"main(['copy', '--device', 'cpu', '--mib', '1', '--runs', '1', '--json', {str(tmp_path / 'c.json')!r}]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'PIL') "
            "or m == 'tools.bench.plot'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_plot_without_matplotlib_fails_before_the_bench_runs(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib: pip install -e '\.\[plot\]'"):
        main(["copy", "--device", "cpu", "--mib", "1", "--runs", "1", "--json", str(tmp_path / "c.json"),
              "--plot", str(tmp_path / "c.png")])
    assert not (tmp_path / "c.json").exists()            # refused up front: nothing measured, nothing lost
