"""The errors tinyinfer raises for bad input, in the bottom package so that every layer above can raise
and catch them without importing the module that first detects the fault: a checkpoint's configuration
(ConfigError), its files (CheckpointError), a request (RequestError) and a sampling parameter
(InvalidParam). Each names what is wrong, the value seen and what to do."""
from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something tinyinfer cannot run (or is malformed)."""


class CheckpointError(Exception):
    """The checkpoint cannot be read: missing path or tensor, wrong shape, truncated file, ..."""


class RequestError(ValueError):
    """A request cannot run (empty, too long for the context or the KV pool, non-finite logits).
    `field`: the request field at fault when it is one of the sampling parameters (for an API's error
    "param"); None for the prompt and the request as a whole."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class InvalidParam(ValueError):
    """A SamplingParams field holds a value the sampler cannot use; `field` names it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field
