"""The CUDA road's bookkeeping, checked on any machine: every kernel in ops/cuda.py's CUDA_IMPLS is bound in
cuda/bindings.cpp, registered for the `cuda` key of an op that has a reference, and (when `make build`
has run here) present in the compiled module -- so a forgotten m.def shows in CI, not on the GPU."""
from __future__ import annotations

import re

import pytest
import torch

from tinyinfer import extensions, ops
from tinyinfer.ops import reference
from tinyinfer.ops.cuda import CUDA_IMPLS

BINDINGS = (extensions.CUDA_DIR / "bindings.cpp").read_text()


@pytest.mark.parametrize("name", sorted(CUDA_IMPLS))
def test_each_cuda_impl_is_bound_and_registered(name):
    assert re.search(rf'm\.def\(\s*"{name}"', BINDINGS), f'cuda/bindings.cpp lacks m.def("{name}", ...)'
    assert callable(getattr(ops, name, None)), f"tinyinfer.ops has no op {name}"
    assert callable(getattr(reference, name, None)), f"tinyinfer/ops/reference.py has no {name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tinyinfer::{name}", "CUDA")


def test_prebuilt_module_exposes_every_cuda_impl(prebuilt_extension):
    missing = [name for name in CUDA_IMPLS if not callable(getattr(prebuilt_extension, name, None))]
    assert not missing, f"the compiled extension lacks {missing}"


def test_an_up_to_date_prebuilt_module_that_does_not_import_is_an_error_when_strict(tmp_path, monkeypatch):
    # The prebuilt_extension fixture loads with strict=True: a module whose stamp matches but which
    # fails to import (an undefined symbol) fails the tests that need it instead of skipping them.
    monkeypatch.setattr(extensions, "build_directory", lambda arch: tmp_path)
    assert extensions.load_prebuilt("90a", strict=True) is None                 # no build: None (skip)
    (tmp_path / "broken.so").write_bytes(b"not a shared object")
    (tmp_path / "stamp.json").write_text(f'{{"library": "broken.so", "fingerprint": '
                                         f'"{extensions.fingerprint("90a")}"}}')
    assert extensions.load_prebuilt("90a") is None                              # the runtime recompiles
    with pytest.raises(ImportError):
        extensions.load_prebuilt("90a", strict=True)
