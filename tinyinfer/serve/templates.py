"""Chat templates rendered in worker processes, with a deadline and an output limit.

A chat template is a program from a model repository. The Jinja sandbox stops it from touching the
process, but not from looping (`range(100000)` nested) or building a huge string (`'x' * 10**9`), and
a pure-Python render holds the GIL: in a thread it would still stall the event loop. So templates
render in a small pool of worker processes (`python -m tinyinfer.serve.templates`: Jinja and
loading/chat.py only, no torch), each under an address-space limit. The parent waits for the answer up
to --template-timeout seconds, then kills the worker (a fresh one starts for the next render); the
output is built through Jinja's generator and stopped at `max_chars` (loading/chat.py render).

Protocol: one JSON line per job on the worker's stdin, one JSON line back ({"text"} or {"error"}).
"""
from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
from typing import Any, Optional

from tinyinfer.loading.chat import ChatTemplateError, render

_WORKER_MEMORY = 2**30      # address space a worker may map (bytes): a memory bomb is a MemoryError


class _Worker:
    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyinfer.serve.templates"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def call(self, job: dict, timeout_s: float) -> dict:
        """The worker's answer; TimeoutError (the worker killed) past timeout_s."""
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            self.kill()
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:                                # it died (killed by the memory limit, ...)
            self.kill()
            raise ChatTemplateError("the chat template crashed its render worker on this conversation")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class TemplateRenderer:
    """`render(...)`: loading/chat.py render in a worker process. Blocking: call it off the loop."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self._idle: queue.SimpleQueue = queue.SimpleQueue()     # a worker, or None: start one
        for _ in range(workers):
            self._idle.put(None)
        self._size = workers

    def render(self, template: str, messages: list[dict], max_chars: int, tools: Optional[list] = None,
               documents: Optional[list] = None, special_tokens: Optional[dict] = None,
               template_kwargs: Optional[dict[str, Any]] = None) -> str:
        job = {"args": dict(template=template, messages=messages, max_chars=max_chars, tools=tools,
                            documents=documents, special_tokens=special_tokens),
               "kwargs": template_kwargs or {}}
        worker: Optional[_Worker] = self._idle.get()
        try:
            if worker is None or worker.proc.poll() is not None:
                worker = _Worker()
            answer = worker.call(job, self.timeout_s)
        except TimeoutError:
            worker = None
            raise ChatTemplateError(f"the chat template did not finish within {self.timeout_s:g} s "
                                    "on this conversation (--template-timeout)") from None
        except ChatTemplateError:
            worker = None
            raise
        finally:
            self._idle.put(worker)
        if "error" in answer:
            raise ChatTemplateError(answer["error"])
        return answer["text"]

    def close(self) -> None:
        for _ in range(self._size):
            worker = self._idle.get()
            if worker is not None:
                worker.kill()
            self._idle.put(None)


def _serve() -> None:
    """The worker: render jobs from stdin until it closes. At a lower CPU priority (nice 10): a
    template that loops until its deadline yields the CPU to the engine thread."""
    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY, _WORKER_MEMORY))
    except (ImportError, ValueError, OSError):      # no such limit here: the deadline still holds
        pass
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            answer = {"text": render(**job["args"], **job["kwargs"])}
        except ChatTemplateError as err:
            answer = {"error": str(err)}
        except TypeError as err:                    # a template variable named like an argument
            answer = {"error": f"chat_template_kwargs: {err}"}
        except MemoryError:                         # building the answer itself
            answer = {"error": "the chat template ran out of memory on this conversation"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
