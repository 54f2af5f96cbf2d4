"""The CUDA road's bookkeeping, checked on any machine: every kernel in ops/cuda.py's CUDA_IMPLS is bound in
cuda/bindings.cpp, registered for the `cuda` key of an op that has a reference, and (when `make build`
has run here) present in the compiled module -- so a forgotten m.def shows in CI, not on the GPU."""
from __future__ import annotations

import re

import pytest
import torch

from tinyinfer import kernels, ops
from tinyinfer.ops import reference
from tinyinfer.ops.cuda import CUDA_IMPLS

BINDINGS = (kernels.CUDA_DIR / "bindings.cpp").read_text()


@pytest.mark.parametrize("name", sorted(CUDA_IMPLS))
def test_each_cuda_impl_is_bound_and_registered(name):
    assert re.search(rf'm\.def\(\s*"{name}"', BINDINGS), f'cuda/bindings.cpp lacks m.def("{name}", ...)'
    assert callable(getattr(ops, name, None)), f"tinyinfer.ops has no op {name}"
    assert callable(getattr(reference, name, None)), f"tinyinfer/ops/reference.py has no {name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tinyinfer::{name}", "CUDA")


def test_prebuilt_module_exposes_every_cuda_impl(prebuilt_extension):
    missing = [name for name in CUDA_IMPLS if not callable(getattr(prebuilt_extension, name, None))]
    assert not missing, f"the compiled extension lacks {missing}"
