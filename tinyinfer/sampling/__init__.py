"""Sampling: what a request asks for (`params.py` SamplingParams, validated at construction), what its
parameters do to the logits (`processors.py`) and how the next token is drawn (`sampler.py`: greedy,
keyed Gumbel sampling, speculative acceptance, the finite check). It sits below the model code, which
never needs it, and above config/ for its errors. `structured.py` StructuredOutput: what a constrained
request's output must match."""

__all__ = ["SamplingParams", "StructuredOutput"]
_PUBLIC = {"SamplingParams": "tinyinfer.sampling.params", "StructuredOutput": "tinyinfer.sampling.structured"}


def __getattr__(name: str):
    # Resolved on first use: importing one module of the package does not import the others (and torch).
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tinyinfer.sampling' has no attribute {name!r}")
