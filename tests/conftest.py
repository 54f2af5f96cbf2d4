"""pytest set-up shared by every test file: markers, and visible skips of GPU-only tests on a CPU.

Markers: `cuda` (needs a CUDA GPU; skipped with a reason elsewhere; `make gpu-check` runs
`pytest -m cuda` and fails if any of them is skipped), `sanitizer` (one small CUDA test per kernel
that `make gpu-check` also runs under compute-sanitizer memcheck) and `fuzz` (the whole fuzz-style
suite, one test per mutation: deselected unless asked for, `pytest -m fuzz tests/test_fuzz.py`, or
TINYINFER_FUZZ=1; the default run samples it, tests/test_fuzz.py), and `fresh_machine` (`make run` in a
fresh clone with a python3 that refuses system installs: minutes, deselected unless -m names it).
"""
from __future__ import annotations

import os

import random

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # The demo models are tiny: OpenMP threads cost more in synchronisation than they save, and on a
    # busy 2-core machine they made the suite ~10x slower. One thread keeps it fast and steady.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped (visibly) without one")
    config.addinivalue_line("markers", "sanitizer: small CUDA test run under compute-sanitizer by make gpu-check")
    config.addinivalue_line("markers", "fuzz: every mutation of the fuzz-style suite (pytest -m fuzz); "
                                       "deselected unless -m names it or TINYINFER_FUZZ=1")
    config.addinivalue_line("markers", "torchrun: launches torchrun (CPU, gloo, loopback; ~1 min in all); "
                                       "runs by default, `-m 'not torchrun'` leaves it out")
    config.addinivalue_line("markers", "fresh_machine: make run in a fresh clone with a python3 that "
                                       "refuses system installs (minutes); deselected unless -m names it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, env in (("fuzz", "TINYINFER_FUZZ"), ("fresh_machine", None)):     # opt-in markers
        if marker in (config.getoption("markexpr") or "") or (env and os.environ.get(env)):
            continue
        chosen = [item for item in items if item.get_closest_marker(marker) is not None]
        if chosen:
            config.hook.pytest_deselected(items=chosen)
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); runs in make gpu-check")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_extension():
    """The built CUDA extension; FAILS (never skips) on a GPU machine where it did not build, so a
    kernel test cannot pass by silently running the reference instead."""
    from tinyinfer import extensions
    return extensions.require_extension()


@pytest.fixture(scope="session")
def prebuilt_extension():
    """The module `make build` compiled on this machine (also without a GPU); skips where it cannot
    exist (no toolkit, CPU-only torch) or is stale; FAILS where it is up to date but does not import
    (a missing symbol), which is a broken build, not a missing one."""
    from tinyinfer import extensions
    if extensions.find_cuda_home() is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit or CPU-only torch: the extension cannot be built here")
    try:
        module = extensions.load_prebuilt(extensions.target_arch(), strict=True)
    except ImportError as err:
        pytest.fail(f"the prebuilt extension is up to date but does not import: {err}")
    if module is None:
        pytest.skip("no up-to-date prebuilt extension: run `make build` first")
    return module


# Fresh inputs every run; the seed is in every test id that uses it ("...-seed1234]"): a failure names it.
FRESH_SEED = random.SystemRandom().randrange(2**31)


@pytest.fixture(params=[FRESH_SEED], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    return request.param
