"""The engine's ops: one custom op per hot operation, with a reference body and kernel overrides.

    from tinyinfer import ops
    ops.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

reference.py: what each op computes (plain PyTorch); library.py: the `torch.library` custom ops whose
bodies are those references; cpu.py (with cpu_attention.py, cpu_matmul.py) / cuda.py: faster kernels
registered for the `cpu` / `cuda` dispatch keys of the same ops; limits.py: what the CUDA kernels
cover. Callers use the names below.
"""
from tinyinfer.ops import cpu, cuda
from tinyinfer.ops.library import (fused_add_rmsnorm, int4_linear, linear, paged_attention,
                                   q8_linear, rms_norm, rope_store_kv, silu_and_mul, store_kv)
from tinyinfer.ops.reference import paged_prefill_attention, prefill_attention

__all__ = ["fused_add_rmsnorm", "int4_linear", "linear", "paged_attention", "paged_prefill_attention",
           "prefill_attention", "q8_linear", "rms_norm", "rope_store_kv", "silu_and_mul", "store_kv"]

cpu.register_cpu_kernels()
cuda.register_cuda_kernels()
