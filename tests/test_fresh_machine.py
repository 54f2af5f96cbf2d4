"""`make run` on a fresh machine whose python3 refuses system-wide installs (PEP 668).

A distribution's Python (Debian 12's, for one) marks its standard library with an EXTERNALLY-MANAGED
file, and pip then refuses to install outside a virtual environment. We build such an interpreter
honestly: a prefix of its own (bin/python3, a copy of this interpreter's base executable, and
lib/python3.X/ holding links to every entry of the real standard library, an empty site-packages and
the marker), so that sys.prefix is that prefix -- not a venv, whose stdlib would be the base one's --
and check that pip run by it refuses. Then `make run` in a fresh `git clone` of this repository, with
that python3 first on PATH and no virtual environment active, must create .venv, install into it and
generate. Minutes (pip installs torch into the new .venv), so opt-in: `pytest -m fresh_machine`
(`make test-fresh-machine`, which .ci/run runs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.fresh_machine


def externally_managed_python(root: Path) -> Path:
    """A python3 under `root` whose stdlib carries the EXTERNALLY-MANAGED marker (module docstring)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix,
                                            "base": sys.base_prefix})["stdlib"])
    base_exe = Path(sys.base_prefix) / "bin" / version
    if not base_exe.exists() or not (stdlib / "os.py").exists():
        pytest.skip(f"this Python's layout is not the POSIX one ({base_exe}, {stdlib})")
    (root / "bin").mkdir(parents=True)
    lib = root / "lib" / version
    lib.mkdir(parents=True)
    shutil.copy2(base_exe, root / "bin" / "python3")
    for so in (Path(sys.base_prefix) / "lib").glob("libpython*"):   # a shared-library build
        (root / "lib" / so.name).symlink_to(so)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "EXTERNALLY-MANAGED"):
            (lib / entry.name).symlink_to(entry)
    (lib / "site-packages").mkdir()
    (lib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=This Python is managed by the system (a PEP 668 test stand-in).\n")
    return root / "bin" / "python3"


def clean_env(bin_dir: Path) -> dict:
    """This machine's environment with no virtual environment active and `bin_dir` first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME")}
    active = [os.path.dirname(sys.executable)] if sys.prefix != sys.base_prefix else []
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in active]
    env["PATH"] = os.pathsep.join([str(bin_dir)] + path)
    return env


def test_make_run_in_a_fresh_clone_with_an_externally_managed_python(tmp_path):
    python3 = externally_managed_python(tmp_path / "system")
    env = clean_env(python3.parent)
    # the stand-in is honest: its own pip (this venv's pip module, run by it) refuses to install
    import pip
    refuse = subprocess.run([str(python3), "-m", "pip", "install", "--dry-run", "--no-index", "six"],
                            env=dict(env, PYTHONPATH=str(Path(pip.__file__).parents[1])),
                            capture_output=True, text=True, timeout=120)
    assert refuse.returncode != 0 and "externally-managed-environment" in refuse.stdout + refuse.stderr, (
        refuse.stdout + refuse.stderr)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    run = subprocess.run(["make", "run"], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (clone / ".venv" / "bin" / "python").exists()
    assert "ROMEO:" in run.stdout and "generated" in run.stderr, run.stderr[-2000:]
