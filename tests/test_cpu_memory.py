"""Memory on a CPU (docs/cpu-performance.md): loading converts each weight for its CPU kernel at load,
nothing imports torch's compiler stack into an engine that never compiles, and a loaded GGUF file is
not left mapped (its pages would count in the process's RSS)."""
from __future__ import annotations

import subprocess
import sys

import torch

from gguf_util import build
from tinyinfer.engine.llm import LLM
from tinyinfer.extensions import cpu as cpu_kernels
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.ops import cpu_matmul


def test_loading_and_decoding_on_a_cpu_leave_torch_compiler_unimported():
    # Drawing the embedding on the meta device, or a custom op without a CPU kernel, imports torch's
    # compiler stack (~100 MiB resident, triton included) into an engine that never compiles.
    code = ("import sys; from tinyinfer.engine.llm import LLM; "
            "from tinyinfer.sampling.params import SamplingParams as S; "
            "llm = LLM('models/shakespeare-llama', device='cpu', max_kv_tokens=256); "
            "llm.generate([[1, 2, 3]], S(temperature=0.0, max_tokens=3, ignore_eos=True)); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_loaded_gguf_file_is_not_kept_mapped(tmp_path):
    path, _ = build(tmp_path, "llama", "Q4_1")
    llm = LLM(path, device="cpu", max_kv_tokens=64)
    import gc
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if str(path) in line]
    assert mapped == [], f"{path} is still mapped after loading: {mapped[:2]}"
    assert llm.generate([[1, 2]])[0].finish_reason in ("length", "stop")


def test_cpu_weights_are_converted_at_load_and_reused_by_the_kernels():
    llm = LLM("models/shakespeare-llama", device="cpu", quant="int4", group_size=32, max_kv_tokens=256)
    int4 = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    assert int4 and llm.dtype == torch.bfloat16
    x = torch.randn(3, int4[0].in_features, dtype=torch.bfloat16)
    if cpu_kernels.library() is not None:
        # The C++ kernel multiplies by the layer's own tensors: no second INT4 form is ever made.
        y = int4[0](x)
        assert not any(m.qweight in cache for m in int4
                       for cache in (cpu_matmul._TINYGEMM, cpu_matmul._DEQUANTIZED))
    else:
        packed = {id(m): cpu_matmul._TINYGEMM[m.qweight][3] for m in int4}      # made by the loader
        y = int4[0](x)
        assert cpu_matmul._TINYGEMM[int4[0].qweight][3] is packed[id(int4[0])]   # not converted again
    ref = x.float() @ int4[0].dequantize().float().T
    assert torch.allclose(y.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
