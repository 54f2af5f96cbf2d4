"""`SamplingParams`: what a request asks of the sampler and of the engine (how many tokens, when to stop,
whether to report log-probabilities), validated at construction so that a bad value is refused before
the request runs (`InvalidParam` naming the field). Applied by sampling/processors.py and
sampling/sampler.py.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from tinyinfer.config.errors import InvalidParam
from tinyinfer.sampling.structured import StructuredOutput

MAX_LOGPROBS = 20    # top-N log-probabilities a request may ask for (OpenAI's API allows up to 20)
SEED_RANGE = (-2**63, 2**63)     # seeds are 64-bit signed integers (the sampler keys on an int64)
_FLOAT_MAX = 1.7976931348623157e308
# The sampler divides float32 logits by the temperature and by / times the repetition penalty: beyond
# these bounds float32 underflows (x / 0 = inf, NaN) and a request would sample garbage silently.
MIN_TEMPERATURE = 1e-6                 # 0 means greedy; a positive temperature is at least this
PENALTY_RANGE = (1e-6, 1e6)


def as_int(x: object) -> Optional[int]:
    """x as a Python int when it is an integer -- a Python int, a numpy integer or a 0-d integer torch
    tensor -- but never a bool (True is not token 1); else None. Token ids are read through this."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.dim() != 0 or x.dtype == torch.bool)):
        return None
    try:
        return operator.index(x)       # numpy bools and floats refuse, as do float tensors
    except TypeError:
        return None


@dataclass(slots=True)
class SamplingParams:
    """What a request asks of the sampler. temperature 0 means greedy; top_k 0 means off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0                 # stop ids and stop strings are ignored before this many tokens
    logprobs: int | None = None         # per token: its log-probability and the top-N (None: off)
    skip_special_tokens: bool = True     # drop special tokens (BOS, <|im_end|>, ...) from the text
    structured: StructuredOutput | None = None   # constrain the output to a schema / regex / grammar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """InvalidParam (a ValueError) naming the first invalid field (construction runs this; the
        engine runs it again when a request arrives, since the fields stay assignable)."""
        def bad(field: str, value: object, want: str) -> InvalidParam:
            text = repr(value)
            text = text if len(text) <= 80 else text[:77] + "..."
            return InvalidParam(f"SamplingParams.{field}={text} is invalid: {want}", field)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x: object) -> bool:           # an int too large for a float is not one
            return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= _FLOAT_MAX

        t = self.temperature
        if not is_real(t) or not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
            raise bad("temperature", t, f"use a finite number >= 0: 0 (greedy) or at least "
                      f"{MIN_TEMPERATURE:g}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "use an integer >= 0 (0 turns top-k off)")
        if not is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "use a number in (0, 1] (1 turns top-p off)")
        if not is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", self.min_p, "use a number in [0, 1] (0 turns min-p off)")
        rp = self.repetition_penalty
        if not is_real(rp) or not PENALTY_RANGE[0] <= rp <= PENALTY_RANGE[1]:
            raise bad("repetition_penalty", rp, f"use a number in [{PENALTY_RANGE[0]:g}, "
                      f"{PENALTY_RANGE[1]:g}] (1 turns it off)")
        lo, hi = SEED_RANGE
        if self.seed is not None and (not is_int(self.seed) or not lo <= self.seed < hi):
            raise bad("seed", self.seed, "use None or an integer of 64 bits, in [-2**63, 2**63)")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "use an integer >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x
                                                                   for x in self.stop):
                raise bad("stop", self.stop, "use a non-empty string or a list of non-empty strings")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            given = self.stop_token_ids
            ids = [as_int(t) for t in given] if isinstance(given, (list, tuple)) else [None]
            if any(t is None or t < 0 for t in ids):
                raise bad("stop_token_ids", self.stop_token_ids, "use a list of token ids >= 0")
            self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "use True or False")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"use an integer from 0 to max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", self.logprobs, f"use None (off) or an integer from 0 to {MAX_LOGPROBS} "
                      "(how many most likely tokens to report besides the sampled one)")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", self.skip_special_tokens, "use True or False")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise bad("structured", self.structured, "use None or a StructuredOutput(json_schema=..., "
                      "json_object=True, regex=..., choice=[...] or grammar=...)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
