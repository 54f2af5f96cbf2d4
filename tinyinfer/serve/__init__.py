"""tinyinfer's OpenAI-compatible HTTP server: `python -m tinyinfer.serve --ckpt PATH`.

    async_engine.py   one thread owns the LLMEngine; asyncio handlers add / abort / stream through it
    protocol.py       request schema (pydantic, strict), fields supported / ignored / refused
    responses.py      response and chunk objects, logprobs layouts, server-sent events
    metrics.py        Prometheus metrics
    limits.py         bounds checked before the work they bound: body size, JSON size, sequences, prompt
    templates.py      chat templates rendered in worker processes, with a deadline and an output limit
    streaming.py      server-sent events and whole responses; disconnects abort
    app.py            the FastAPI app: plain handler functions, errors; docs/concurrency.md
    __main__.py       command line, uvicorn, graceful shutdown

Needs the `serve` extra (fastapi, uvicorn, pydantic, prometheus_client, jinja2).
"""
