"""Test helper: a tinyinfer server on a free loopback port, in a thread of the test process (so tests
can look at its engine), stopped by the fixture that started it."""
from __future__ import annotations

import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tinyinfer.engine.llm_engine import LLMEngine  # noqa: E402
from tinyinfer.serve.app import build_app  # noqa: E402
from tinyinfer.serve.limits import Limits  # noqa: E402


class AppThread:
    """Any ASGI app under uvicorn on 127.0.0.1:<free port>, in a daemon thread; stop() ends it."""

    def __init__(self, app):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def client(self, timeout: float = 60, api_key: str = "none", asynchronous: bool = False):
        """The real openai client (sync, or async) against this server's /v1, without retries."""
        return openai_client(self.url + "/v1", timeout, api_key, asynchronous)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


class ServerThread(AppThread):
    """A tinyinfer server (build_app over `engine`) as an AppThread; the engine stays reachable."""

    def __init__(self, engine: LLMEngine, name: str = "demo", api_key: str | None = None,
                 limits: Limits = Limits()):
        self.engine = engine
        super().__init__(build_app(engine, name, api_key, limits))


def openai_client(base_url: str, timeout: float = 60, api_key: str = "none", asynchronous: bool = False):
    """openai.OpenAI (or AsyncOpenAI) at base_url with max_retries=0: a failure shows at once."""
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text exposition (name includes any labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
