"""`make gpu-check`: turn a few minutes on a GPU into verified kernels and figures (docs/gpu-check.md).

One command, < 5 minutes (300 s; with `make gpu-tune` < 8 min), nothing installed, run from the repo (PYTHONPATH=.):
  1. build the extension for the card in front of it (MAX_JOBS = cores); copy the library to
     $OUT/build/ext/<tag>/ -- put that folder back at build/ext/<tag>/ (e.g. carry build/ext) and a
     rerun loads it instead of compiling, as long as its stamp matches the sources and torch
  2. the CUDA tests (`pytest -m cuda`): FAIL if any is skipped, fails, or none ran
  3. compute-sanitizer memcheck over the `sanitizer`-marked tests (one small test per kernel);
     "unavailable" when the machine refuses the sanitizer -- neither a pass nor a kernel failure
  4. the benchmarks: copy bandwidth, each kernel bench, then e2e (tools/bench/)
  5. JSON + logs under $OUT (else ./gpu-check-out/), each plotting bench's figure beside its JSON when
     matplotlib is installed (tools/bench/plot.py; else redraw later with `python -m tools.bench.plot`),
     and a short table printed last.
Exit status 0 only when the build, every CUDA test and every benchmark succeeded and the sanitizer
found no error. On a machine without a GPU it says so and stops with status 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from tinyinfer import extensions
from tools.bench import bench_names, load_bench
from tools.bench.common import format_table, git_commit

REPO = extensions.REPO_ROOT
BUDGET_S = 300                       # whole check: with make gpu-tune (150 s) < 8 min (docs/gpu-check.md)
CAPS_S = {"build": 120, "tests": 110, "sanitizer": 90, "bench": 120}


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """Run cmd (in its own process group, killed whole on timeout); (exit code or None, output, seconds)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace"), time.perf_counter() - start


def tail(text: str, lines: int = 40) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def sanitizer_verdict(code: int | None, text: str) -> tuple[str, str, bool]:
    """(status, detail, fails the check) from memcheck's exit code (None: timed out) and output.
    No "ERROR SUMMARY" line means memcheck never ran the program: the machine refused it."""
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    ran = re.search(r"(\d+) passed", text)
    if code is None:
        return "timeout", "memcheck did not finish in its time budget", False
    if summary and int(summary[1]) > 0:
        return "FAIL", f"{summary[1]} memory errors (see sanitizer.log)", True
    if summary and code == 0 and ran:
        return "ok", f"0 errors over {ran[1]} tests", False
    if summary:
        return "FAIL", "tests failed or none ran under memcheck (see sanitizer.log)", True
    reason = next((l.strip() for l in text.splitlines() if "rror" in l or "not supported" in l), f"exit {code}")
    return "unavailable", f"the sanitizer refused to run here: {reason[:160]}", False


def tests_verdict(code: int | None, counts: dict[str, int]) -> tuple[bool, str]:
    """(ok, detail) for the CUDA tests: every one ran and passed -- a skip is a failure here."""
    failed = counts.get("failures", 0) + counts.get("errors", 0)
    passed = counts.get("tests", 0) - failed - counts.get("skipped", 0)
    detail = f"{passed} passed, {failed} failed, {counts.get('skipped', 0)} skipped"
    if counts.get("skipped", 0):
        detail += " (a skipped CUDA test is a failure here)"
    return code == 0 and counts.get("skipped", 0) == 0 and passed > 0, detail


class Check:
    def __init__(self, out: Path):
        self.out, self.deadline = out, time.perf_counter() + BUDGET_S
        self.steps: list[dict] = []
        self.figures: list[dict] = []

    def budget(self, step: str) -> float:
        return min(CAPS_S[step], self.deadline - time.perf_counter())

    def record(self, name: str, status: str, seconds: float, detail: str, failing: bool, **extra) -> dict:
        step = {"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail,
                "failing": failing, **extra}
        self.steps.append(step)
        print(f"[gpu-check] {name}: {status} ({seconds:.0f} s) {detail}", flush=True)
        return step

    # 1. build ----------------------------------------------------------------------------------
    def build(self) -> bool:
        arch = extensions.target_arch()
        code, text, secs = run_logged([sys.executable, "-m", "tinyinfer.extensions", "build"], self.out / "build.log",
                                      self.budget("build"), env={"MAX_JOBS": str(os.cpu_count() or 1)})
        directory = extensions.build_directory(arch)
        if (directory / "build.log").is_file():  # the compiler's own output (ptxas report included)
            shutil.copy2(directory / "build.log", self.out / "compile.log")
        if code != 0:
            print(tail(text, 60), flush=True)
            self.record("build", "FAIL" if code is not None else "TIMEOUT", secs, f"sm_{arch}; see compile.log",
                        True)
            return False
        keep = self.out / "build" / "ext" / directory.name  # a rerun can carry this back as build/ext
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("tinyinfer_cuda.so", "stamp.json", "resources.json"):
            if (directory / name).is_file():
                shutil.copy2(directory / name, keep / name)
        report = [line for line in text.splitlines() if "regs," in line]  # full report: build.log
        spilling = [line.split("<--")[0].strip() for line in report if "SPILLS" in line]
        print("\n".join(["spilling kernels:"] + spilling if spilling else []), flush=True)
        self.record("build", "ok", secs, f"sm_{arch}, {len(report)} kernels, {len(spilling)} spilling", False,
                    arch=f"sm_{arch}", spilling=spilling, library=str(keep / "tinyinfer_cuda.so"))
        return True

    # 2. CUDA tests -----------------------------------------------------------------------------
    def tests(self) -> None:
        junit = self.out / "pytest-cuda.xml"
        # With pytest-xdist (on the GPU image), tests run in worker processes: a test that crashes
        # its process is reported as failed and the others still run and report.
        try:
            import xdist  # noqa: F401
            workers = ["-n", "4"]
        except ImportError:
            workers = []
        code, text, secs = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rs",
                                       "-p", "no:cacheprovider", f"--junitxml={junit}", *workers],
                                      self.out / "tests.log", self.budget("tests"))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        try:
            for suite in ET.parse(junit).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
        except (OSError, ET.ParseError):
            pass
        ok, detail = tests_verdict(code, counts)
        if not ok:
            print(tail(text, 60), flush=True)
        self.record("cuda tests", "ok" if ok else ("TIMEOUT" if code is None else "FAIL"), secs, detail, not ok,
                    **counts)

    # 3. compute-sanitizer ----------------------------------------------------------------------
    def sanitizer(self) -> None:
        home = extensions.find_cuda_home()
        found = [p for p in ([home / "bin" / "compute-sanitizer", home / "compute-sanitizer" / "compute-sanitizer"]
                             if home else []) if p.is_file()]
        tool = str(found[0]) if found else shutil.which("compute-sanitizer")
        if tool is None:
            self.record("sanitizer", "unavailable", 0, "compute-sanitizer not found in the toolkit or on PATH", False)
            return
        # No caching allocator: each tensor is its own allocation, so an out-of-bounds access is caught
        # instead of landing silently inside a neighbouring cached block.
        code, text, secs = run_logged([tool, "--tool", "memcheck", "--print-limit", "20", sys.executable, "-m",
                                       "pytest", "-m", "cuda and sanitizer", "tests", "-q", "-p", "no:cacheprovider"],
                                      self.out / "sanitizer.log", self.budget("sanitizer"),
                                      env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        status, detail, failing = sanitizer_verdict(code, text)
        if failing or status != "ok":
            print(tail(text, 30), flush=True)
        self.record("sanitizer", status, secs, detail, failing)

    # 4. benchmarks -----------------------------------------------------------------------------
    def benches(self, only: list[str] | None = None) -> None:
        (self.out / "bench").mkdir(exist_ok=True)
        for name in only or bench_names():
            try:
                arg_lists = getattr(load_bench(name), "GPU_CHECK_ARGS", [[]])
            except (ImportError, TypeError) as err:
                self.record(f"bench {name}", "FAIL", 0, f"cannot import: {err}", True)
                continue
            for i, extra in enumerate(arg_lists):
                label = name if len(arg_lists) == 1 else f"{name}#{i + 1}"
                result = self.out / "bench" / f"{label.replace('#', '-')}.json"
                left = self.budget("bench")
                if left < 5:
                    self.record(f"bench {label}", "NOT RUN", 0, "out of the time budget", True)
                    continue
                code, text, secs = run_logged([sys.executable, "-m", "tools.bench", name, "--device", "cuda",
                                               "--json", str(result), *extra],
                                              self.out / "bench" / f"{label.replace('#', '-')}.log", left)
                if code != 0:
                    print(tail(text, 30), flush=True)
                    self.record(f"bench {label}", "TIMEOUT" if code is None else "FAIL", secs, " ".join(extra), True)
                    continue
                recorded = json.loads(result.read_text()) if result.is_file() else {}
                self.figures += [{"bench": label, **row} for row in recorded.get("summary", [])]
                self.record(f"bench {label}", "ok", secs, " ".join(extra) + self.plot(recorded, result), False)

    @staticmethod
    def plot(recorded: dict, result: Path) -> str:
        """The bench's figure beside its JSON, when it draws one and matplotlib is here (never a failure:
        the figures are in the JSON either way)."""
        name = str(recorded.get("bench", "")).split("#")[0]
        if not name or not callable(getattr(load_bench(name), "figure", None)) \
                or importlib.util.find_spec("matplotlib") is None:
            return ""
        try:
            from tools.bench.plot import plot_result
            return f" (plot {plot_result(recorded, result.with_suffix('.png')).name})"
        except Exception as err:                   # a figure that cannot be drawn must not hide the figures
            return f" (no plot: {type(err).__name__}: {err})"

    def finish(self, device: str) -> int:
        failed = [s["step"] for s in self.steps if s["failing"]]
        report = {"device": device, "commit": git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "result": "FAIL" if failed else "PASS", "failed": failed, "steps": self.steps,
                  "figures": self.figures}
        (self.out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"\n=== gpu-check on {device}, commit {report['commit']}, torch {torch.__version__} ===")
        print(format_table(self.steps, ["step", "status", "seconds", "detail"]))
        if self.figures:
            columns = ["name", "value", "unit"] + sorted({k for r in self.figures for k in r} -
                                                          {"bench", "name", "value", "unit"})
            print("\n" + format_table(self.figures, columns))
        print(f"\nRESULT: {report['result']}" + (f" (failed: {', '.join(failed)})" if failed else "")
              + f" -- JSON and logs in {self.out}")
        return 1 if failed else 0


def main() -> int:
    out = Path(os.environ.get("OUT") or REPO / "gpu-check-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        msg = ("gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False; torch "
               f"{torch.__version__}, CUDA build {torch.version.cuda}). This check runs on a GPU machine "
               "(H100/H200); nothing was run. On this machine use `make build` and `make test`.")
        (out / "gpu-check.json").write_text(json.dumps({"result": "NO GPU", "message": msg}, indent=1) + "\n")
        print(msg, file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    device = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    print(f"[gpu-check] {device}; {os.cpu_count()} cores; output -> {out}", flush=True)
    if shutil.which("nvidia-smi"):
        run_logged(["nvidia-smi"], out / "nvidia-smi.log", 30)
    check = Check(out)
    if check.build():
        check.tests()
        check.sanitizer()
        check.benches()
    else:
        check.record("cuda tests", "NOT RUN", 0, "the extension did not build", True)
        check.benches(only=["copy"])  # the kernel benches would only retry the failed build
    return check.finish(device)


if __name__ == "__main__":
    sys.exit(main())
