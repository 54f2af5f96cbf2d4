"""Test helper: torchrun launches on the loopback -- each "node" one torchrun whose processes (the agent
and the workers under it) are recorded as they appear, so a test can tell that none of them is left
and kill them all in a finally."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from hf_util import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One torchrun ("a node"): its agent and every process under it ever seen (torchrun starts each
    worker in a session of its own, so the process group does not hold them: the tree does)."""

    def __init__(self, args: list[str], log: str):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(TORCHRUN + args, stdout=out, stderr=subprocess.STDOUT,
                                         env=ENV, cwd=REPO, start_new_session=True)
        self.pids = {self.proc.pid}

    def refresh(self) -> set[int]:
        """Record the processes under the agent now; all that were ever seen."""
        parents = _parents()
        grew = True
        while grew:
            found = {p for p, pp in parents.items() if pp in self.pids}
            grew = not found <= self.pids
            self.pids |= found
        return self.pids

    def workers(self) -> list[int]:
        return sorted(self.refresh() - {self.proc.pid})

    def wait(self, timeout_s: float) -> int:
        """The launch's exit code, watching its processes meanwhile; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            self.refresh()
            assert time.monotonic() < deadline, f"the launch ran past {timeout_s} s:\n{self.text()}"
            time.sleep(0.05)
        return self.proc.returncode

    def alive(self) -> list[int]:
        """Processes of this node still running (not zombies)."""
        live = _parents()
        return sorted(p for p in self.pids if p in live)

    def wait_gone(self, timeout_s: float) -> list[int]:
        """Processes still alive after up to timeout_s (empty: all gone)."""
        deadline = time.monotonic() + timeout_s
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def kill(self) -> None:
        """SIGKILL every process of this node, then reap the agent."""
        for pid in self.refresh():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) "
        if fields[0] != "Z":
            found[int(name)] = int(fields[1])
    return found


def wait_for(node: Node, text: str, timeout_s: float) -> str:
    """The node's log once it contains `text`; fails if the launch ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        node.refresh()
        content = node.text()
        if text in content:
            return content
        assert node.proc.poll() is None, f"the launch ended ({node.proc.returncode}) before {text!r}:\n{content}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{content}"
        time.sleep(0.1)
