"""Tensor parallelism (CPU, gloo, N = 2) seen from outside: the server's /health turns 503 naming the
rank once a worker is lost; SIGKILL of the engine's process leaves no rendezvous directory behind
(its workers remove it as they exit); a script that builds the engine without the __main__ guard is
told so; LLM.generate after close() is a clear error."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from hf_util import LLAMA, REPO
from serve_util import ServerThread
from tinyinfer import LLM, LLMEngine, SamplingParams

if not os.path.isdir("/proc/self"):
    pytest.skip("the process checks read /proc (Linux)", allow_module_level=True)
ENV = {**os.environ, "PYTHONPATH": REPO}


def test_health_is_503_naming_the_rank_once_a_worker_died():
    srv = ServerThread(LLMEngine(LLAMA, device="cpu", tensor_parallel_size=2, max_kv_tokens=256))
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        [pid] = srv.engine.runner.worker_pids
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "rank 1" in r.json()["reason"], r.text
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert r.status_code in (500, 503) and "rank 1" in r.text, r.text
    finally:
        srv.stop()
        srv.engine.close()


SCRIPT = """
import sys, time
from tinyinfer import LLM
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, max_kv_tokens=256)
print(llm.engine.runner.spec.store, *llm.engine.runner.worker_pids, flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_engine_leaves_no_rendezvous_directory(tmp_path):
    script = tmp_path / "tp.py"
    script.write_text("if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in
                                                              SCRIPT.strip().splitlines()))
    proc = subprocess.Popen([sys.executable, str(script), LLAMA], stdout=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO)
    try:
        store, *pids = proc.stdout.readline().split()
        assert os.path.isdir(os.path.dirname(store))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while os.path.isdir(os.path.dirname(store)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.isdir(os.path.dirname(store)), "the rendezvous directory was left"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_a_stale_rendezvous_directory_is_removed_by_the_next_engine():
    stale = tempfile.mkdtemp(prefix="tinyinfer-tp-999999999-")     # no such process
    with LLM(LLAMA, device="cpu", tensor_parallel_size=2, max_kv_tokens=256):
        assert not os.path.isdir(stale)
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"tinyinfer-tp-{os.getpid()}-*"))


def test_a_script_without_the_main_guard_is_told_about_it(tmp_path):
    script = tmp_path / "noguard.py"
    script.write_text(SCRIPT.replace("time.sleep(600)", ""))
    run = subprocess.run([sys.executable, str(script), LLAMA], capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=300)
    assert run.returncode != 0
    assert 'if __name__ == "__main__":' in run.stderr, run.stderr[-2000:]


def test_generate_after_close_is_a_clear_error():
    llm = LLM(LLAMA, device="cpu", max_kv_tokens=256)
    llm.close()
    with pytest.raises(RuntimeError, match="this LLM is closed"):
        llm.generate(["ROMEO:"], SamplingParams(max_tokens=2))
