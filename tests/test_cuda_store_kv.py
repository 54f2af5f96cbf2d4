"""store_kv: the CUDA kernel (cuda/store_kv.cu) against the reference in tinyinfer/ops/reference.py.

The kernel only moves bits, so on fresh random inputs its caches must equal the reference's bit for bit
(compared as integers, so NaN poison compares too): every written row, and every row it must leave
alone -- padding slots (-1) and all unused slots, which start as NaN. The CPU tests check the build
road itself: sources, flags, registration and the reference fallback.
"""
from __future__ import annotations

import pytest
import torch

from tinyinfer import extensions, ops
from tinyinfer.ops import cuda as ops_cuda
from tinyinfer.ops import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (T, Hkv, D, Dv, block_size); Dv = 0 is MLA (one latent head, no V). D = 5 forces 2-byte words,
# D = 40 / Dv = 24 non-power-of-two rows, 576 the DeepSeek latent (512 + 64 rope).
SHAPES = [(37, 2, 64, 64, 16), (5, 8, 128, 128, 16), (9, 1, 576, 0, 16), (13, 3, 40, 24, 8), (6, 3, 5, 5, 4)]
NUM_BLOCKS = 7


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _slots(T: int, num_slots: int, device: str, gen: torch.Generator) -> torch.Tensor:
    # Distinct random slots, about one token in four padding (-1).
    slots = torch.randperm(num_slots, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.25] = -1
    return slots.to(device)


def _inputs(T, H, D, Dv, BS, dtype, device, seed, cache_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    k = torch.randn(T, H, D, generator=gen).to(device, dtype)
    v = torch.randn(T, H, Dv, generator=gen).to(device, dtype) if Dv else None
    k_cache = torch.full((NUM_BLOCKS, BS, H, D), float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full((NUM_BLOCKS, BS, H, Dv), float("nan"), dtype=cache_dtype, device=device) if Dv else None
    return k, v, k_cache, v_cache, _slots(T, NUM_BLOCKS * BS, device, gen)


def _check_against_reference(k, v, k_cache, v_cache, slots, seed=None):
    want_k = k_cache.clone()
    want_v = v_cache.clone() if v_cache is not None else None
    reference.store_kv(k, v, want_k, want_v, slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(_bits(k_cache), _bits(want_k)), f"k_cache differs from the reference (seed {seed})"
    if v_cache is not None:
        assert torch.equal(_bits(v_cache), _bits(want_v)), f"v_cache differs from the reference (seed {seed})"


# ----------------------------------------------------------------------------------------------
# CPU: the build of the extension
# ----------------------------------------------------------------------------------------------

def test_sources_are_every_cu_file_plus_bindings():
    names = [p.name for p in extensions.sources()]
    assert "store_kv.cu" in names and names.count("bindings.cpp") == 1
    assert sorted(n for n in names if n.endswith(".cu")) == sorted(p.name for p in extensions.CUDA_DIR.glob("*.cu"))


def test_builds_only_the_target_arch():
    _, nvcc = extensions.compile_flags("90a")
    assert [f for f in nvcc if "arch" in f] == ["-gencode=arch=compute_90a,code=sm_90a"]
    if not torch.cuda.is_available():
        assert extensions.target_arch() == "90a"


def test_store_kv_has_a_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tinyinfer::store_kv", "CUDA")


def test_cuda_impl_falls_back_to_the_reference_without_extension(monkeypatch):
    monkeypatch.setattr(extensions, "extension", lambda: None)
    def kernel_must_not_run(ext, *args):
        raise AssertionError("called the extension although there is none")
    impl = ops_cuda._cuda_impl("store_kv", kernel_must_not_run, reference.store_kv)
    k, v, k_cache, v_cache, slots = _inputs(11, 2, 8, 8, 4, torch.float32, "cpu", seed=0)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, slots)
    impl(k, v, k_cache, v_cache, slots)
    assert torch.equal(_bits(k_cache), _bits(want_k)) and torch.equal(_bits(v_cache), _bits(want_v))


def _fake_gpu_machine(monkeypatch, tmp_path, compile_result):
    # A GPU machine without a prebuilt module, whose JIT compile returns or raises compile_result.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extensions, "target_arch", lambda: "90a")
    monkeypatch.setattr(extensions, "load_prebuilt", lambda arch: None)
    monkeypatch.setattr(extensions, "build_directory", lambda arch: tmp_path / "ext")
    def compile_extension(arch, verbose=False):
        if isinstance(compile_result, Exception):
            raise compile_result
        return compile_result
    monkeypatch.setattr(extensions, "compile_extension", compile_extension)


def test_first_use_on_a_gpu_compiles_with_one_line(monkeypatch, tmp_path, capsys):
    module = object()
    _fake_gpu_machine(monkeypatch, tmp_path, module)
    assert extensions._load.__wrapped__() == (module, "")
    assert capsys.readouterr().err == "tinyinfer: compiling CUDA kernels (first run only)...\n"


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    _fake_gpu_machine(monkeypatch, tmp_path, RuntimeError("ninja: build stopped\nstore_kv.cu(3): error: boom"))
    with pytest.warns(RuntimeWarning, match="reference ops") as caught:
        module, reason = extensions._load.__wrapped__()
    assert module is None and "error: boom" in reason and len(caught) == 1
    assert "error: boom" in (tmp_path / "ext" / "jit-error.log").read_text()


def test_prebuilt_extension_imports_here(prebuilt_extension):
    # `make build` (run by .ci/run before the tests) compiles and imports the module on this machine;
    # this proves the prebuilt library still loads (no missing symbols) and exposes the op.
    assert callable(prebuilt_extension.store_kv)


def test_bindings_parse_arguments_and_reject_cpu_tensors(prebuilt_extension):
    # The pybind layer on this CPU machine: None for v/v_cache parses, and the checks speak clearly.
    k, _, k_cache, _, slots = _inputs(4, 1, 8, 0, 4, torch.float16, "cpu", seed=8)
    with pytest.raises(RuntimeError, match="same CUDA device"):
        prebuilt_extension.store_kv(k, None, k_cache, None, slots)
    with pytest.raises(RuntimeError, match="1-D int64"):
        prebuilt_extension.store_kv(k, None, k_cache, None, slots.int())


# ----------------------------------------------------------------------------------------------
# CUDA: kernel vs reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_extension_is_built(cuda_extension):
    assert callable(cuda_extension.store_kv)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-D{}-Dv{}-BS{}".format(*s))
def test_kernel_equals_reference(cuda_extension, shape, dtype):
    seed = torch.randint(0, 2**31, ()).item()  # fresh inputs every run; printed on failure
    _check_against_reference(*_inputs(*shape, dtype, "cuda", seed), seed=seed)


@pytest.mark.cuda
@pytest.mark.sanitizer
def test_kernel_small_case(cuda_extension):
    # The case compute-sanitizer replays in make gpu-check: K and V, padding, all copy widths' paths.
    for shape in [(8, 2, 64, 64, 16), (6, 3, 5, 5, 4)]:
        _check_against_reference(*_inputs(*shape, torch.bfloat16, "cuda", seed=1))
    _check_against_reference(*_inputs(5, 1, 576, 0, 16, torch.float16, "cuda", seed=2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_sources_and_caches(cuda_extension, dtype):
    # K/V as slices of a fused qkv projection output, caches as two halves of one kv tensor.
    T, H, D, BS = 21, 2, 64, 16
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    qkv = torch.randn(T, 4 * H, D, generator=gen).to("cuda", dtype)
    k, v = qkv[:, 2 * H:3 * H], qkv[:, 3 * H:]
    kv = torch.full((NUM_BLOCKS, BS, 2, H, D), float("nan"), dtype=dtype, device="cuda")
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    assert not k_cache.is_contiguous()
    slots = _slots(T, NUM_BLOCKS * BS, "cuda", gen)
    want = kv.clone()
    reference.store_kv(k, v, want[:, :, 0], want[:, :, 1], slots)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(_bits(kv), _bits(want))


@pytest.mark.cuda
def test_converts_to_the_cache_dtype_like_the_reference(cuda_extension):
    _check_against_reference(*_inputs(10, 2, 64, 64, 16, torch.float32, "cuda", seed=3,
                                      cache_dtype=torch.bfloat16))


@pytest.mark.cuda
def test_empty_batch_is_a_no_op(cuda_extension):
    k, v, k_cache, v_cache, slots = _inputs(0, 2, 64, 64, 16, torch.float16, "cuda", seed=4)
    ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()


@pytest.mark.cuda
def test_replays_in_a_cuda_graph_with_new_slots(cuda_extension):
    # The launch shape depends only on T: a captured store_kv must follow new slot values on replay.
    k, v, k_cache, v_cache, slots = _inputs(8, 2, 64, 64, 16, torch.bfloat16, "cuda", seed=5)
    ops.store_kv(k, v, k_cache, v_cache, slots)  # warm up (loads the extension) outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.store_kv(k, v, k_cache, v_cache, slots)
    k_new, v_new, _, _, slots_new = _inputs(8, 2, 64, 64, 16, torch.bfloat16, "cuda", seed=6)
    k.copy_(k_new), v.copy_(v_new), slots.copy_(slots_new)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(k_cache), _bits(want_k)) and torch.equal(_bits(v_cache), _bits(want_v))


@pytest.mark.cuda
def test_bad_arguments_get_clear_errors(cuda_extension):
    k, v, k_cache, v_cache, slots = _inputs(4, 2, 64, 64, 16, torch.float16, "cuda", seed=7)
    with pytest.raises(RuntimeError, match="int64"):
        cuda_extension.store_kv(k, v, k_cache, v_cache, slots.int())
    with pytest.raises(RuntimeError, match="together"):
        cuda_extension.store_kv(k, v, k_cache, None, slots)
    with pytest.raises(RuntimeError, match="do not fit"):
        cuda_extension.store_kv(k[:, :, :32], v, k_cache, v_cache, slots)
    every_other = torch.zeros(*k_cache.shape[:3], 2 * k_cache.shape[3], dtype=k_cache.dtype, device="cuda")
    with pytest.raises(RuntimeError, match="unit-stride"):
        cuda_extension.store_kv(k, v, every_other[..., ::2], v_cache, slots)
