"""`python -m tinyinfer.serve` as a user runs it: it announces its address (--port 0 picks a free one),
serves, and on SIGTERM / SIGINT shuts down gracefully -- a stream in flight still completes in full --
then ends as the signal says (killed by SIGTERM, exit 130 after SIGINT), without a traceback."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from hf_util import LLAMA, REPO

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer.serve", "--ckpt", LLAMA, "--port", "0",
                             "--device", "cpu", "--dtype", "float32", "--max-kv-tokens", "2048", *extra],
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    timer = threading.Timer(60, proc.kill)                # bounded: never wait forever for the line
    timer.start()
    try:
        for line in proc.stderr:
            if (m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)):
                return proc, m.group(1)
        raise AssertionError(f"the server exited without announcing itself (code {proc.wait()})")
    finally:
        timer.cancel()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_running_stream_finish_then_ends_the_process(sig):
    proc, url = start_server("--served-model-name", "bard")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "bard"
        body = {"model": "bard", "prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        proc.send_signal(sig)             # shut down while the stream runs
        assert events[-1] == "data: [DONE]"
        assert '"completion_tokens":120' in events[-2] and '"finish_reason":"length"' in events[-3]
        assert proc.wait(timeout=60) == (130 if sig == signal.SIGINT else -sig)   # as the signal says
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyinfer.serve", "--ckpt", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "nope" in proc.stderr


def test_a_port_in_use_is_one_line_and_exit_2_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "tinyinfer.serve", "--ckpt", LLAMA, "--port",
                               str(port)], capture_output=True, text=True, cwd=REPO, timeout=120,
                               env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot listen on 127.0.0.1:") and "--port" in proc.stderr
    assert "Traceback" not in proc.stderr and "loaded" not in proc.stderr


@pytest.mark.parametrize("flag, value", [("--max-request-bytes", "0"), ("--template-timeout", "-1")])
def test_a_bound_that_is_not_positive_is_one_line_and_exit_2(flag, value):
    proc = subprocess.run([sys.executable, "-m", "tinyinfer.serve", "--ckpt", LLAMA, flag, value],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                               env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {flag} "), proc.stderr
