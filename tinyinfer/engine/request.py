"""A request at the engine's door: its prompt turned into token ids and checked against what the model
and the KV pool can hold, so a request that cannot run is refused with a RequestError naming the
problem before it takes a slot in the batch (continuous batching, Yu et al., "Orca", OSDI 2022).

Everything a caller hands in is checked here, per request, so one bad request never fails the others:
the prompt (text, or token ids given as Python / numpy / torch integers -- never bools, floats, None or
nested lists), the SamplingParams (again: its fields stay assignable after construction), the ids
against the vocabulary, and prompt + max_tokens against the context and the whole KV pool.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from tinyinfer.config.errors import InvalidParam, RequestError
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling.params import SamplingParams, as_int

# Text, or token ids: a list / tuple of integers, or a 1-D integer numpy array or torch tensor.
Prompt = Union[str, Sequence[int], np.ndarray, torch.Tensor]


def _describe(x: object) -> str:
    text = repr(x)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(x).__name__})"


def is_single_prompt(prompts: object) -> bool:
    """Whether LLM.generate was handed one prompt rather than a list of them: text, a 1-D array, or a
    list / tuple whose first item is a token id. Anything else that is not a list, tuple or 2-D array
    counts as one (malformed) prompt, refused on its own."""
    if isinstance(prompts, (np.ndarray, torch.Tensor)):
        return prompts.ndim != 2
    if isinstance(prompts, (list, tuple)):
        return bool(prompts) and as_int(prompts[0]) is not None
    return True


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> list[int]:
    """Text is tokenized (BOS as the checkpoint says); token ids are taken as given, as Python ints.
    RequestError for anything else, naming what was seen."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("empty prompt: give at least one token or character")
        return tokenizer.encode(prompt)
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1:
            raise RequestError(f"a prompt array must be 1-D (token ids), got shape {tuple(prompt.shape)}")
        items = prompt.tolist()       # Python ints (or bools / floats, refused below)
    elif isinstance(prompt, (list, tuple)):
        items = prompt
    else:
        hint = "; decode bytes to str first" if isinstance(prompt, (bytes, bytearray)) else ""
        raise RequestError(f"a prompt must be text (str) or a list of token ids, got {_describe(prompt)}"
                           f"{hint}")
    ids = [as_int(t) for t in items]
    bad = next((i for i, t in enumerate(ids) if t is None), None)
    if bad is not None:
        raise RequestError(f"prompt item {bad} is {_describe(items[bad])}, not a token id: give integers "
                           "(Python, numpy or torch; not bools)")
    return ids


def validate_request(ids: list[int], params: SamplingParams, config: ModelConfig,
                     blocks: BlockManager) -> None:
    """RequestError unless the params are valid, the prompt is non-empty and in the vocabulary, and
    prompt + max_tokens fits the model's context and the whole KV pool."""
    limit, vocab = config.max_context, config.vocab_size
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling params must be a SamplingParams, got {_describe(params)}")
    try:
        params.validate()
    except InvalidParam as err:
        raise RequestError(str(err), err.field) from None
    if not ids:
        raise RequestError("empty prompt: give at least one token or character")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    bad = next((t for t in params.stop_token_ids or [] if t >= vocab), None)
    if bad is not None:
        raise RequestError(f"SamplingParams.stop_token_ids holds {bad}, outside the vocabulary "
                           f"[0, {vocab}): it could never stop the request", "stop_token_ids")
    # max_tokens is at fault when even a one-token prompt could not fit with it, else the prompt.
    total = len(ids) + params.max_tokens
    if total > limit:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} = {total} "
                           f"exceeds the model's context of {limit} tokens; shorten the prompt or "
                           "lower max_tokens", "max_tokens" if params.max_tokens >= limit else None)
    if blocks.blocks_for(total) > blocks.num_blocks:
        alone = blocks.blocks_for(1 + params.max_tokens) > blocks.num_blocks
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} needs more "
                           f"KV cache than the whole pool holds ({blocks.num_blocks * blocks.block_size} "
                           "tokens); raise max_kv_tokens or lower max_tokens",
                           "max_tokens" if alone else None)
