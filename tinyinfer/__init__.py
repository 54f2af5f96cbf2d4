"""tinyinfer: a small, from-scratch LLM inference engine (paged KV cache, INT4, MLA, speculative decoding).

    from tinyinfer import LLM, SamplingParams
"""
__all__ = ["LLM", "RequestError", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `import tinyinfer.ops` (or the CLI's --help) should not load the whole engine.
    if name in ("LLM", "RequestError", "RequestOutput"):
        from tinyinfer import engine
        return getattr(engine, name)
    if name == "SamplingParams":
        from tinyinfer.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'tinyinfer' has no attribute {name!r}")
