"""python -m tinyinfer.generate: stream a completion from a checkpoint, then one line of figures.

    python -m tinyinfer.generate --ckpt models/shakespeare-llama --prompt "ROMEO:" --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tinyinfer.loading.checkpoint import CheckpointError
from tinyinfer.loading.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tinyinfer.generate",
        description="Generate text from a Llama-family or DeepSeek-MLA checkpoint with tinyinfer. "
                    "Text streams to stdout as it is generated; a line of figures follows on stderr.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a Hugging Face directory, one .safetensors file (config.json "
                        "beside it or in its metadata; tinyinfer's own INT4 files too), or a .gguf file")
    p.add_argument("--prompt", default="", help="prompt text (BOS added as the checkpoint says)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top prob")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=False,
                   help="keep generating past the end-of-sequence token")
    p.add_argument("--show-special", action=argparse.BooleanOptionalAction, default=False,
                   help="print special tokens (BOS, chat markers such as <|im_end|>) in the text; "
                        "by default they are dropped")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="float32, float16 or bfloat16 (default: float32 on CPU -- bfloat16 for a model "
                        "with INT4 weights, which torch's CPU INT4 matmul takes -- and the "
                        "checkpoint's half type on GPU)")
    p.add_argument("--quant", choices=["int4"], default=None, help="quantize weights on the fly")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="--quant int4: input channels per scale and zero point (default 128; a layer "
                        "whose width it does not divide takes 64 or 32)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: a draft checkpoint path, or 'ngram'")
    p.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per step (1..15)")
    p.add_argument("--max-kv-tokens", type=int, default=None,
                   help="cap the paged KV cache at this many tokens (default: sized from memory)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps as CUDA graphs (default: on with a CUDA device); "
                        "--no-cuda-graphs launches every kernel from Python, to compare")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print one JSON object (text, token ids, figures) instead of streaming")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinyinfer.engine.llm import LLM
    from tinyinfer.memory import kv_figures
    from tinyinfer.sampling_params import SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, max_tokens=args.max_new_tokens, stop=args.stop,
                                ignore_eos=args.ignore_eos,
                                skip_special_tokens=not args.show_special)
        t_load = time.perf_counter()
        llm = LLM(args.ckpt, device=args.device, dtype=args.dtype, quant=args.quant,
                  group_size=args.group_size,
                  draft=args.draft, speculate_k=args.speculate_k, max_kv_tokens=args.max_kv_tokens,
                  cuda_graphs=args.cuda_graphs, verbose=not args.json)
        t_load = time.perf_counter() - t_load
    except (CheckpointError, ConfigError, ValueError, NotImplementedError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    first_token_at = None

    def on_token(delta) -> None:
        nonlocal first_token_at
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if not args.json and delta.new_text:
            sys.stdout.write(delta.new_text)
            sys.stdout.flush()

    if not args.json:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    try:
        out = llm.generate([args.prompt], params, on_token=on_token)[0]
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    t1 = time.perf_counter()
    if out.error is not None:
        print(f"\nerror: {out.error}", file=sys.stderr)
        return 2
    n_gen, n_prompt = len(out.token_ids), len(out.prompt_token_ids)
    ttft = (first_token_at or t1) - t0
    decode_tps = (n_gen - 1) / (t1 - first_token_at) if n_gen > 1 and first_token_at else 0.0
    figures = {"prompt_tokens": n_prompt, "generated_tokens": n_gen, "ttft_s": round(ttft, 4),
               "decode_tokens_per_s": round(decode_tps, 2), "finish_reason": out.finish_reason,
               "load_s": round(t_load, 2), "device": str(llm.device), "dtype": str(llm.dtype)}
    figures.update(llm.figures() if hasattr(llm, "figures") else {})
    figures.update(kv_figures(llm.config, llm.dtype))     # KV bytes/token, and vs MHA's
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": out.text, "token_ids": out.token_ids,
                          **figures}))
    else:
        sys.stdout.write("\n")
        extra = "".join(f" | {k}: {v}" for k, v in figures.items()
                        if k not in ("prompt_tokens", "generated_tokens", "ttft_s",
                                     "decode_tokens_per_s", "load_s", "device", "dtype"))
        print(f"[{n_prompt} prompt tokens | {n_gen} generated | time to first token "
              f"{ttft * 1e3:.1f} ms | decode {decode_tps:.1f} tokens/s | {figures['device']} "
              f"{figures['dtype'].replace('torch.', '')}{extra}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
