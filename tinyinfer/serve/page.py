"""The chat page at GET /: three static files in tinyinfer/serve/web/ (HTML, JS, CSS; no build step,
nothing fetched from elsewhere) that talk to this server's own OpenAI endpoints from the browser --
streamed chat completions (server-sent events read with fetch), or plain completions for a model
without a chat template.

    GET /                  index.html
    GET /web/app.js, /web/style.css
    GET /web/config.json   {"chat_template": bool, "api_key_required": bool}: what the page must know
                           before its first request (the key itself is only ever typed into the page)

The page inserts model output as text, never as HTML; the Content-Security-Policy header is a second
wall: only the page's own script runs, so injected markup could not run code even if it got in.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",                    # a new install's page replaces the old at once
}


def read_files() -> dict[str, bytes]:
    """The page's files from the installed package; a clear error if the install lacks them."""
    root = resources.files(__package__) / "web"
    try:
        return {name: (root / name).read_bytes() for name in _TYPES}
    except OSError as err:
        raise FileNotFoundError(f"the chat page's files are missing from this install ({err}): "
                                "reinstall tinyinfer (setup.py ships tinyinfer/serve/web/), or serve "
                                "with --no-web") from err


def add_page(app: FastAPI, chat_template: bool, api_key_required: bool) -> None:
    """Add the page's routes to `app` (outside /v1: the page itself needs no key)."""
    files = read_files()
    config = {"chat_template": chat_template, "api_key_required": api_key_required}

    def file(name: str) -> Response:
        return Response(files[name], media_type=_TYPES[name], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return file("index.html")

    @app.get("/web/config.json", include_in_schema=False)
    async def page_config() -> Response:
        return JSONResponse(config, headers=_HEADERS)

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in files or name == "index.html":
            raise HTTPException(404, f"no page file {name!r}: the page is at /")
        return file(name)
