"""python -m tinyinfer.generate: stream a completion from a checkpoint, then one line of figures; or,
with --chat, an interactive multi-turn chat through the checkpoint's chat template (loading/chat.py).

    python -m tinyinfer.generate --ckpt models/shakespeare-llama --prompt "ROMEO:" --max-tokens 64
    python -m tinyinfer.generate --ckpt path/to/instruct-model --chat --system "Answer briefly."
    python -m tinyinfer.generate --ckpt model.gguf --chat --prompt "What is the capital of France?" </dev/null
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tinyinfer.cli import DEFAULT_MAX_TOKENS, add_engine_arguments, apply_threads, engine_options
from tinyinfer.config.errors import CheckpointError, ConfigError
from tinyinfer.config.help import HelpFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tinyinfer.generate", formatter_class=HelpFormatter,
        description="Generate text from a Llama-family or DeepSeek-MLA checkpoint with tinyinfer. "
                    "Text streams to stdout as it is generated; a line of figures follows on stderr.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a Hugging Face directory, one .safetensors file (config.json "
                        "beside it or in its metadata; tinyinfer's own INT4 files too), or a .gguf file")
    p.add_argument("--prompt", default="", help="prompt text (BOS added as the checkpoint says); with --chat, "
                                                "the first user message (further ones from stdin)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="chat: read a user message per line from stdin, stream each reply; the whole "
                        "conversation goes through the checkpoint's chat template. EOF (Ctrl-D) ends it")
    p.add_argument("--system", default=None, help="with --chat: a system message opening the conversation")
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=None,
                   help=f"tokens to generate at most (default: {DEFAULT_MAX_TOKENS} for --prompt, as "
                        "SamplingParams and the completions API; the rest of the context for a --chat "
                        "turn, as the chat API)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
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
    add_engine_arguments(p)
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print one JSON object (text, token ids, figures) instead of streaming")
    return p.parse_args(argv)


def check_before_loading(args: argparse.Namespace) -> None:
    """The errors a request would meet after the model loaded, raised before loading it: an empty
    prompt, --chat on a checkpoint without a chat template (ValueError / ChatTemplateError)."""
    if not args.chat and not args.prompt:
        raise ValueError("empty prompt: give --prompt TEXT (at least one character), or --chat")
    if args.chat:
        from tinyinfer.loading import checkpoint
        from tinyinfer.loading.chat import choose_template
        from tinyinfer.loading.tokenizer import Tokenizer
        choose_template(Tokenizer.for_checkpoint(checkpoint.locate(args.ckpt)))


def warm_up(llm, params) -> float:
    """One short request (2 prompt tokens or more, 2 new ones) before the clock starts; returns its
    seconds. The first call of each layer converts its weights for the CPU matmuls
    (ops/cpu_matmul.py) and builds the C++ CPU kernels if this machine has none yet: without this,
    that one-time cost would be printed as the prompt's time to first token. The prompt is shorter
    than a KV block, so the prefix cache keeps nothing of it."""
    import dataclasses
    t = time.perf_counter()
    llm.generate(["Hello there"], dataclasses.replace(params, max_tokens=2, ignore_eos=True, stop=None))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinyinfer.engine.llm import LLM
    from tinyinfer.loading.chat import ChatTemplateError
    from tinyinfer.memory import kv_figures
    from tinyinfer.sampling.params import SamplingParams
    say = (lambda msg: None) if args.json else (lambda msg: print(f"tinyinfer: {msg}", file=sys.stderr,
                                                                  flush=True))
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
                                stop=args.stop,
                                ignore_eos=args.ignore_eos,
                                skip_special_tokens=not args.show_special)
        apply_threads(args)
        check_before_loading(args)
        say(f"loading {args.ckpt} ...")
        t_load = time.perf_counter()
        llm = LLM(args.ckpt, verbose=not args.json, **engine_options(args))
        t_load = time.perf_counter() - t_load
        say(f"loaded in {t_load:.2f} s; warming up (first call of each layer) ...")
        t_warm = warm_up(llm, params)
        say(f"warm-up {t_warm:.2f} s")
    except (CheckpointError, ConfigError, ChatTemplateError, ValueError, NotImplementedError, OSError,
            ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.chat:
        return chat_loop(llm, params, args.system, args.max_tokens, first=args.prompt or None)
    first_token_at = None

    def on_token(delta) -> None:
        nonlocal first_token_at
        if first_token_at is None:               # the request was accepted: echo its prompt now
            first_token_at = time.perf_counter()
            if not args.json:
                sys.stdout.write(args.prompt)
        if not args.json and delta.new_text:
            sys.stdout.write(delta.new_text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        out = llm.generate([args.prompt], params, on_token=on_token)[0]
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    t1 = time.perf_counter()
    if out.error is not None:
        print(f"{chr(10) if first_token_at else ''}error: {out.error}", file=sys.stderr)
        return 2
    n_gen, n_prompt = len(out.token_ids), len(out.prompt_token_ids)
    ttft = (first_token_at or t1) - t0
    decode_tps = (n_gen - 1) / (t1 - first_token_at) if n_gen > 1 and first_token_at else 0.0
    figures = {"prompt_tokens": n_prompt, "generated_tokens": n_gen, "ttft_s": round(ttft, 4),
               "decode_tokens_per_s": round(decode_tps, 2), "finish_reason": out.finish_reason,
               "load_s": round(t_load, 2), "warmup_s": round(t_warm, 2), "device": str(llm.device), "dtype": str(llm.dtype)}
    figures.update(llm.figures() if hasattr(llm, "figures") else {})
    figures.update(kv_figures(llm.config, llm.dtype, llm.engine.kv_cache_dtype))   # KV bytes/token, vs MHA
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": out.text, "token_ids": out.token_ids,
                          **figures}))
    else:
        sys.stdout.write("\n")
        extra = "".join(f" | {k}: {v}" for k, v in figures.items()
                        if k not in ("prompt_tokens", "generated_tokens", "ttft_s",
                                     "decode_tokens_per_s", "load_s", "warmup_s", "device", "dtype"))
        print(f"[{n_prompt} prompt tokens | {n_gen} generated | time to first token "
              f"{ttft * 1e3:.1f} ms | decode {decode_tps:.1f} tokens/s | {figures['device']} "
              f"{figures['dtype'].replace('torch.', '')}{extra}]", file=sys.stderr)
    return 0


def chat_loop(llm, params, system: str | None, max_tokens: int | None = None,
              first: str | None = None) -> int:
    """One user message per line of stdin (after `first`, the --prompt, when given), each reply
    streamed to stdout; the history grows turn by turn. EOF (Ctrl-D) ends the chat: exit 0; Ctrl-C: exit 130. A turn the model cannot take (the
    context is full) is dropped from the history. Each reply: up to `max_tokens` tokens, or when None
    up to the end of the context (as the chat API)."""
    import dataclasses
    from tinyinfer.loading.chat import ChatTemplateError, apply_chat_template
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    try:
        while True:
            if first is not None:
                line, first = first, None
            else:
                if interactive:
                    print("you> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
            if not line:                              # EOF / Ctrl-D
                if interactive:
                    print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            ids = apply_chat_template(llm.tokenizer, history)
            turn = dataclasses.replace(params, max_tokens=max_tokens or
                                       max(1, llm.config.max_context - len(ids)))
            out = llm.generate([ids], turn, on_token=lambda d: (sys.stdout.write(d.new_text),
                                                                sys.stdout.flush()))[0]
            sys.stdout.write("\n")
            if out.error is not None:
                print(f"error: {out.error} (this message was dropped)", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": out.text})
            print(f"[{len(out.prompt_token_ids)} prompt tokens | {len(out.token_ids)} generated | "
                  f"{out.finish_reason}]", file=sys.stderr)
    except ChatTemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
