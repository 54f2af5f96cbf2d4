"""The error a checkpoint's configuration raises when tinyinfer cannot run it (its own module so that the
config parser, config.py, and the per-family field parsers, families.py, share it without a cycle)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something tinyinfer cannot run (or is malformed)."""
