"""The command-line options that build an engine (device, dtype, quantization, speculative decoding, KV
pool, batching, tensor parallelism, threads), shared by `python -m tinyinfer.generate` and
`python -m tinyinfer.serve` so that both accept the same flags with the same meaning."""
from __future__ import annotations

import argparse


# One set of sampling defaults for the CLI, the Python API (SamplingParams) and the server: the OpenAI
# API's -- temperature 1.0; max tokens 16 for a completion, the rest of the context for a chat turn.
DEFAULT_MAX_TOKENS = 16


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options that build an LLM / LLMEngine (shared by generate and serve)."""
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="float32, float16 or bfloat16 (default: float32 on CPU -- bfloat16 for a model "
                        "with INT4 weights, which the CPU INT4 matmul takes -- and the "
                        "checkpoint's half type on GPU)")
    p.add_argument("--quant", choices=["int4"], default=None, help="quantize weights on the fly")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="--quant int4: input channels per scale and zero point (default 128; a layer "
                        "whose width it does not divide takes 64 or 32)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: a draft checkpoint path, 'ngram' (prompt lookup) or "
                        "'suffix' (suffix-automaton drafts over the request and recent outputs, "
                        "adaptive length up to --speculate-k) or 'mtp' (a DeepSeek-V3-style checkpoint's "
                        "own multi-token-prediction layer)")
    p.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per step (1..15; the upper bound "
                   "of the adaptive length with --draft suffix)")
    p.add_argument("--max-kv-tokens", type=int, default=None,
                   help="the paged KV cache's size in tokens (overrides --kv-cache-memory)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="the paged KV cache's size in bytes, e.g. 1GiB or 512MiB (default: 4GiB on a "
                        "CPU, 80%% of the GPU memory free after loading on a GPU; never more than "
                        "max context x --max-num-seqs tokens)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto",
                   help="the KV cache's values: auto (the model dtype), fp8 (e4m3) or int8, each with "
                        "a scale per token and head: about twice the tokens in the same memory "
                        "(docs/kv-cache.md)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps as CUDA graphs (default: on with a CUDA device); "
                        "--no-cuda-graphs launches every kernel from Python, to compare")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests in the running batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens one step computes at most (decodes + prefill chunks)")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill long prompts in chunks beside the running decodes (default on)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes seen before (default on)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many ranks: GPUs cuda:0..N-1 (NCCL), or N CPU "
                        "processes (gloo); the engine spawns the workers -- or, under torchrun, the "
                        "launched processes (WORLD_SIZE of them) are the ranks (docs/tensor-parallel.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's intra-op threads for the CPU work (default 1; 0: torch's default, one "
                        "per core). A decode step is hundreds of small ops: more threads help only "
                        "large matmuls with idle cores, and on a busy machine they wait on each other "
                        "(docs/cpu-performance.md: 2 threads on a shared 2-core box, up to 30x slower)")


def engine_options(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the options add_engine_arguments added."""
    return dict(device=args.device, dtype=args.dtype, quant=args.quant, group_size=args.group_size,
                draft=args.draft,
                speculate_k=args.speculate_k, max_kv_tokens=args.max_kv_tokens,
                cuda_graphs=args.cuda_graphs, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=args.enable_chunked_prefill,
                enable_prefix_caching=args.enable_prefix_caching,
                tensor_parallel_size=args.tensor_parallel_size, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype)


def apply_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(--threads) unless it is 0 (torch's own default); refuses a negative."""
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: give a positive number, or 0 for torch's default")
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
