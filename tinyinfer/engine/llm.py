"""`LLM`: the offline API, a thin loop over the online engine (engine/llm_engine.py).

    from tinyinfer import LLM, SamplingParams
    llm = LLM("models/shakespeare-llama")
    outs = llm.generate(["ROMEO:", "JULIET:"], SamplingParams(temperature=0.0, max_tokens=64))
    outs = llm.chat([{"role": "user", "content": "Hi"}])      # checkpoints with a chat template

Every request of a `generate` call runs as one continuously batched workload; a bad request (a
malformed prompt or SamplingParams included) ends with finish_reason "error" (and its RequestError)
while the others finish normally. Several threads may share one LLM: `generate`, `chat` and `logits`
hold the engine's lock for the whole call (engine/locking.py), so concurrent calls run one after another.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence as Seq, Union

import torch

from tinyinfer.config.errors import RequestError
from tinyinfer.engine.llm_engine import LLMEngine
from tinyinfer.engine.locking import engine_lock
from tinyinfer.engine.output import RequestDelta, RequestOutput
from tinyinfer.engine.request import Prompt, is_single_prompt, prompt_ids
from tinyinfer.loading.chat import apply_chat_template, choose_template
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.toolcalls import detect_format, get_format
from tinyinfer.toolcalls.calls import arguments_as_objects
from tinyinfer.toolcalls.forcing import choice_of, forced_output


class LLM:
    """Offline generation. Takes the same options as LLMEngine (device, dtype, quant, group_size,
    draft, speculate_k, max_kv_tokens, block_size, verbose, cuda_graphs, max_num_seqs,
    max_num_batched_tokens, enable_chunked_prefill, enable_prefix_caching, tensor_parallel_size,
    kv_cache_memory: the KV pool's bytes, an int or a size such as "1GiB"; engine/kv_cache.py;
    kv_cache_dtype: "auto" (the model's), "fp8" or "int8", a quantized KV cache, docs/kv-cache.md).
    With tensor_parallel_size > 1, close it (or use `with LLM(...) as llm:`) to stop its workers at
    once; they also stop when it is garbage-collected or the process exits."""

    def __init__(self, path: str, **options):
        self._engine: Optional[LLMEngine] = LLMEngine(path, **options)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm._engine = engine
        return llm

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("this LLM is closed (close() was called, or its `with` block ended); "
                               "create a new LLM to generate again")
        return self._engine

    # The model and its surroundings, for callers that look inside (tests, benchmarks).
    config = property(lambda self: self.engine.config)
    tokenizer = property(lambda self: self.engine.tokenizer)
    model = property(lambda self: self.engine.runner.model)
    device = property(lambda self: self.engine.device)
    dtype = property(lambda self: self.engine.dtype)
    stats = property(lambda self: self.engine.stats)

    def figures(self) -> dict:
        return self.engine.figures()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One teacher-forced forward over `token_ids` (used exactly as given): (len, vocab) float32."""
        with engine_lock(self.engine):
            return self.engine.logits(token_ids)

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 on_token: Optional[Callable[[RequestDelta], None]] = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order. `on_token` is called
        with each step's RequestDelta of every request (streaming); without it the text of a request
        is decoded once, when it ends. Holds the engine's lock throughout."""
        prompts = [prompts] if is_single_prompt(prompts) else list(prompts)
        params = SamplingParams() if params is None else params
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        with engine_lock(self.engine):
            return self._generate(prompts, plist, on_token)

    def _generate(self, prompts: list, plist: list, on_token) -> list[RequestOutput]:
        engine = self.engine
        outputs: list[RequestOutput] = []
        live: dict[str, RequestOutput] = {}
        for prompt, sp in zip(prompts, plist):
            out = RequestOutput(prompt_token_ids=[])
            outputs.append(out)
            try:
                rid = engine.add_request(prompt, sp, stream=on_token is not None)
            except RequestError as err:
                out.prompt_token_ids = _given_ids(prompt)
                out.finish_reason, out.error = "error", err
                continue
            out.prompt_token_ids = list(engine.requests[rid].seq.prompt_ids)
            live[rid] = out
        try:
            while live and engine.has_unfinished():
                for delta in engine.step():
                    out = live.get(delta.request_id)
                    if out is None:
                        continue
                    out.token_ids += delta.new_token_ids
                    out.text += delta.new_text
                    if delta.new_logprobs is not None:
                        out.logprobs = (out.logprobs or []) + delta.new_logprobs
                    if delta.finished:
                        out.finish_reason, out.error = delta.finish_reason, delta.error
                        del live[delta.request_id]
                    if on_token is not None:
                        on_token(delta)
        finally:
            for rid, out in live.items():           # interrupted (KeyboardInterrupt, a raising callback)
                engine.abort(rid)
                out.finish_reason, out.error = "error", RuntimeError("generation interrupted")
            if live:
                engine.step()                       # deliver the aborts: the engine is clean again
        return outputs

    def chat(self, conversations: Union[list[dict], Seq[list[dict]]],
             params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             on_token: Optional[Callable[[RequestDelta], None]] = None, tools: Optional[list[dict]] = None,
             tool_choice: Union[str, dict, None] = None, tool_call_parser: Optional[str] = None,
             **template_args) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or several: each is
        rendered with the checkpoint's chat template (loading/chat.py; `template_args`: documents,
        template, extra template variables), then generated like `generate`. Raises
        ChatTemplateError when the model has no template or the template refuses a conversation.

        Tools (OpenAI tool dicts) are shown to the model through the template; unless tool_choice is
        "none", each output's `tool_calls` and `content` are parsed from its text in the format the
        template asks for (or `tool_call_parser`: "hermes", "llama3_json"; toolcalls/). tool_choice
        "required" or {"type": "function", "function": {"name": N}} constrains each reply to one
        valid call (toolcalls/forcing.py)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        mode, name = choice_of(tool_choice, tools)
        fmt = None
        if mode != "none":
            template = choose_template(self.tokenizer, template_args.get("template"), tools)
            fmt_name = tool_call_parser or detect_format(template)
            if fmt_name is None:
                raise ValueError("the chat template names no tool-call format, so calls cannot be "
                                 "parsed: pass tool_call_parser='hermes' or 'llama3_json' (or "
                                 "tool_choice='none')")
            fmt = get_format(fmt_name)
            if mode != "auto":
                forced = forced_output(fmt, tools, name)
                params = SamplingParams() if params is None else params
                params = ([replace(p, structured=forced) for p in params] if isinstance(params, (list, tuple))
                          else replace(params, structured=forced))
        prompts = [apply_chat_template(self.tokenizer, arguments_as_objects(c), tools=tools, **template_args)
                   for c in conversations]
        outputs = self.generate(prompts, params, on_token)
        for out in outputs if fmt is not None else ():
            parsed = fmt.parse(out.text)
            out.tool_calls, out.content = parsed.calls, parsed.content
        return outputs

    def close(self) -> None:
        """Release the engine (its KV cache and CUDA graphs go with it, and its tensor-parallel
        workers stop)."""
        if self._engine is not None:
            self._engine.close()
        self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _given_ids(prompt: Prompt) -> list[int]:
    """The token ids of a refused prompt, when it was given as valid ids (else [])."""
    if isinstance(prompt, str):
        return []
    try:
        return prompt_ids(prompt, None)
    except RequestError:
        return []

