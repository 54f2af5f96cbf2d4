"""tinyinfer's OpenAI-compatible HTTP server: `python -m tinyinfer.serve --ckpt PATH`.

    async_engine.py   one thread owns the LLMEngine; asyncio handlers add / abort / stream through it
    protocol.py       request schema (pydantic, strict), fields supported / ignored / refused
    responses.py      response and chunk objects, logprobs layouts, server-sent events
    metrics.py        Prometheus metrics
    app.py            the FastAPI app: endpoints, streaming, disconnects, errors
    __main__.py       command line, uvicorn, graceful shutdown

Needs the `serve` extra (fastapi, uvicorn, pydantic, prometheus_client, jinja2).
"""
