"""Typed, range-checked reads of config.json fields: each refuses a missing required field, a wrong type
(a string, a bool where a number goes, JSON's `true` for a layer count) or a value out of range with a
ConfigError naming the field and the value seen, so a checkpoint whose config cannot be right is
refused before any weight is read instead of loading and producing garbage (or failing every request,
or dying in the allocator).

The ranges are what a transformer needs to be computable: sizes are positive integers, rms_norm_eps a
small positive number, rope_theta positive, and so on. The ceilings are sanity limits far above any
published model (the largest vocabularies are ~2^18, hidden sizes ~2^14, expert counts ~2^9); they
stop a typo from asking the allocator for terabytes:
    MAX_DIM        2^22   every width / size (vocab_size, hidden_size, intermediate_size, head_dim, ...)
    MAX_COUNT      2^12   every count (layers, attention heads, experts)
    MAX_POSITIONS  2^24   max_position_embeddings (the RoPE table holds one row per position)
"""
from __future__ import annotations

import math
from typing import Any, Optional

from tinyinfer.config.errors import ConfigError

MAX_DIM = 1 << 22
MAX_COUNT = 1 << 12
MAX_POSITIONS = 1 << 24
REQUIRED = object()          # default of a field config.json must give


def show(value: Any) -> str:
    """repr(value), cut to 60 characters for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def get(cfg: dict, key: str, default: Any = REQUIRED) -> Any:
    """cfg[key], or `default` when it is absent or null; ConfigError when a required field is."""
    value = cfg.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"config field {key} is missing; config.json must give it")
        return default
    return value


def check_int(key: str, value: Any, minimum: int = 1, maximum: int = MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ConfigError(f"config field {key} must be an integer in [{minimum}, {maximum}], got "
                          f"{show(value)}")
    return value


def check_number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = True,
                 high_open: bool = True) -> float:
    """A finite number in the interval (low, high), each end open or closed as given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1.7e308
    if ok:
        value = float(value)
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"config field {key} must be a finite number in {interval}, got {show(value)}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config field {key} must be true or false, got {show(value)}")
    return value


def read_int(cfg: dict, key: str, default: Any = REQUIRED, minimum: int = 1,
             maximum: int = MAX_DIM) -> Optional[int]:
    """An integer field (None stays None when it is the default)."""
    value = get(cfg, key, default)
    return None if value is None else check_int(key, value, minimum, maximum)


def read_bool(cfg: dict, key: str, default: bool = False) -> bool:
    return check_bool(key, get(cfg, key, default))


def read_dict(cfg: dict, key: str) -> dict:
    """An object field (absent or null: {})."""
    value = get(cfg, key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config field {key} must be a JSON object, got {show(value)}")
    return dict(value)


def read_token_ids(key: str, value: Any, vocab_size: int) -> list[int]:
    """A token id or a list of them (null: none), each in [0, vocab_size)."""
    ids = [] if value is None else (value if isinstance(value, list) else [value])
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ConfigError(f"config field {key} must be a token id in [0, {vocab_size}) or a list "
                              f"of them, got {show(value)}")
    return list(ids)
