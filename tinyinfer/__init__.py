"""tinyinfer: a small, from-scratch LLM inference engine (paged KV cache, INT4, MLA, speculative decoding).

    from tinyinfer import LLM, LLMEngine, SamplingParams

`LLM` is the offline API (generate a batch of prompts), `LLMEngine` the online one (add_request / step /
abort). The layout of the package: docs/architecture.md.
"""
__all__ = ["LLM", "LLMEngine", "RequestDelta", "RequestError", "RequestOutput", "SamplingParams",
           "StructuredOutput"]

_PUBLIC = {"LLM": "tinyinfer.engine.llm", "LLMEngine": "tinyinfer.engine.llm_engine",
           "RequestDelta": "tinyinfer.engine.output", "RequestOutput": "tinyinfer.engine.output",
           "RequestError": "tinyinfer.config.errors", "SamplingParams": "tinyinfer.sampling.params",
           "StructuredOutput": "tinyinfer.sampling.structured"}


def __getattr__(name: str):
    # Resolved on first use, so `python -m tinyinfer.generate --help` or `import tinyinfer.ops` does not
    # load the whole engine (and torch's CUDA set-up) first.
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tinyinfer' has no attribute {name!r}")
