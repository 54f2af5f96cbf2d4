"""pytest set-up shared by every test file: markers, and visible skips of GPU-only tests on a CPU.

Markers: `cuda` (needs a CUDA GPU; skipped with a reason elsewhere; `make gpu-check` runs
`pytest -m cuda` and fails if any of them is skipped) and `sanitizer` (one small CUDA test per kernel
that `make gpu-check` also runs under compute-sanitizer memcheck).
"""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped (visibly) without one")
    config.addinivalue_line("markers", "sanitizer: small CUDA test run under compute-sanitizer by make gpu-check")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
    from tinyinfer import kernels
    return kernels.require_extension()
