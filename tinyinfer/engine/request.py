"""A request at the engine's door: its prompt turned into token ids and checked against what the model
and the KV pool can hold, so a request that cannot run is refused with a RequestError naming the
problem before it takes a slot in the batch (continuous batching, Yu et al., "Orca", OSDI 2022).
"""
from __future__ import annotations

from typing import Union

from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.sequence import RequestError
from tinyinfer.loading.config import ModelConfig
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.sampling_params import SamplingParams

Prompt = Union[str, list[int]]


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> list:
    """Text is tokenized (BOS as the checkpoint says); a list of ids is taken as given."""
    if prompt == "":
        raise RequestError("empty prompt: give at least one token or character")
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def validate_request(ids: list, params: SamplingParams, config: ModelConfig, blocks: BlockManager) -> None:
    """RequestError unless the prompt is non-empty, in the vocabulary, and prompt + max_tokens fits the
    model's context and the whole KV pool."""
    limit, vocab = config.max_context, config.vocab_size
    if not ids:
        raise RequestError("empty prompt: give at least one token or character")
    bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
    total = len(ids) + params.max_tokens
    if total > limit:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} = {total} "
                           f"exceeds the model's context of {limit} tokens; shorten the prompt or "
                           "lower max_tokens")
    if blocks.blocks_for(total) > blocks.num_blocks:
        raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} needs more "
                           f"KV cache than the whole pool holds ({blocks.num_blocks * blocks.block_size} "
                           "tokens); raise max_kv_tokens or lower max_tokens")
