"""Tensor parallelism launched by torchrun (engine/torchrun.py), CPU / gloo on the loopback, against the
same model in one process: greedy tokens and logits of an `LLM` built in a torchrun script (Llama, MLA,
INT4), `python -m tinyinfer.generate` and `serve` (MLA) under `torchrun --standalone` (whose ranks stop when
torchrun's agent is killed), and two "nodes" (two torchruns,
--nnodes 2, a rendezvous on 127.0.0.1) serving through the OpenAI API, read with the `openai` client.
Then kill -9 of rank 1 mid-generation: the stream ends, /health turns 503 naming the rank, its host and
pid within the documented bound, and no process of either node is left. The step's wire format
round-trips exactly, and a tensor_parallel_size that disagrees with torchrun's WORLD_SIZE is refused.

Every launch is its own process group, killed in a finally; every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
import torch

from hf_util import LLAMA, MLA
from tinyinfer import LLM, SamplingParams
from tinyinfer.engine import step_wire, torchrun
from tinyinfer.engine.batch import StepBatch
from torchrun_util import Node, free_port, wait_for

pytestmark = pytest.mark.torchrun
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo!"]
LAUNCH_S = 120            # a launch on a busy 2-core machine: rendezvous, two loads, the steps

SCRIPT = """
import json, sys
from tinyinfer import LLM, SamplingParams
if __name__ == "__main__":
    path, quant, prompts = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
    llm = LLM(path, device="cpu", dtype="float32", quant=quant, tensor_parallel_size=2, max_kv_tokens=256)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    logits = llm.logits(llm.tokenizer.encode(prompts[1]))
    print("RESULT", json.dumps({"tokens": [o.token_ids for o in outs], "logits": logits.tolist()}),
          flush=True)
    llm.close()
"""


def test_the_step_round_trips_through_its_words():
    batch = StepBatch([5, 7, 9], [0, 1, 40], [3, 4, 700], [2, 41], [0, 2, 3], [[0], [1, 2, 43]],
                      prefill=False, sampling=([0.0, 0.7], [-2**63, 2**63 - 1], [0, 12]))
    for op, args in (("execute", (batch,)), ("execute", (batch, True)), ("execute_sampled", (batch,))):
        words = torch.frombuffer(step_wire.encode(op, *args), dtype=torch.int64)
        got_op, got, *rest = step_wire.decode(words)
        assert (got_op, rest) == (op, list(args[1:]))
        assert got == batch
    big = StepBatch(list(range(3000)), list(range(3000)), list(range(3000)), [3000], [0, 3000],
                    [list(range(188))], prefill=True)
    words = step_wire.encode("execute", big)
    assert len(words) > step_wire.FIRST                   # two broadcasts
    assert step_wire.decode(torch.frombuffer(words, dtype=torch.int64))[1] == big
    assert step_wire.decode(torch.tensor([step_wire.HEAD - 1, 3, 0, 0, 0, 4])) == (
        "enable_verify_graphs", 4)
    with pytest.raises(ValueError, match="unknown tensor-parallel command 99"):
        step_wire.decode(torch.tensor([step_wire.HEAD - 1, 99, 0, 0, 0, 0]))


def test_a_size_that_disagrees_with_world_size_is_refused(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    assert torchrun.launched() == torchrun.Launch(0, 2, 0, f"127.0.0.1:{os.environ['MASTER_PORT']}")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4, but torchrun started WORLD_SIZE=2.*"
                                         r"--tensor-parallel-size 2"):
        LLM(LLAMA, device="cpu", tensor_parallel_size=4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun.launched() is None                     # one process: no group


def _standalone(args: list[str]) -> list:
    return ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0"] + args


@pytest.mark.parametrize("path, quant", [(LLAMA, ""), (MLA, ""), (LLAMA, "int4")],
                         ids=["llama", "mla", "int4"])
def test_an_llm_in_a_torchrun_script_equals_one_process(tmp_path, path, quant):
    script = tmp_path / "tp.py"
    script.write_text(SCRIPT)
    node = Node(_standalone([str(script), path, quant, json.dumps(PROMPTS)]), str(tmp_path / "log"))
    try:
        assert node.wait(LAUNCH_S) == 0, node.text()
        text = node.text()
        assert len(node.pids) >= 3 and not node.wait_gone(10)    # the agent, two ranks (and any child)
    finally:
        node.kill()
    got = json.loads(next(line for line in text.splitlines() if "RESULT " in line).split("RESULT ", 1)[1])
    one = LLM(path, device="cpu", dtype="float32", quant=quant or None, max_kv_tokens=256)
    assert got["tokens"] == [o.token_ids for o in one.generate(PROMPTS, GREEDY)]
    want = one.logits(one.tokenizer.encode(PROMPTS[1]))
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))


def test_generate_under_torchrun_standalone_equals_one_process(tmp_path):
    args = ["-m", "tinyinfer.generate", "--ckpt", LLAMA, "--device", "cpu", "--prompt", PROMPTS[1],
            "--max-tokens", "16", "--temperature", "0", "--ignore-eos", "--json",
            "--tensor-parallel-size", "2"]
    node = Node(_standalone(args), str(tmp_path / "log"))
    try:
        assert node.wait(LAUNCH_S) == 0, node.text()
        text = node.text()
        assert len(node.pids) >= 3 and not node.wait_gone(10)
    finally:
        node.kill()
    got = json.loads(next(line for line in text.splitlines() if line.startswith('{"prompt"')))
    one = LLM(LLAMA, device="cpu", max_kv_tokens=256)
    assert got["token_ids"] == one.generate([PROMPTS[1]], GREEDY)[0].token_ids


def _get(url: str):
    import httpx
    return httpx.get(url, timeout=10)


def test_two_nodes_serve_the_openai_api_and_a_killed_rank_stops_them_cleanly(tmp_path):
    openai = pytest.importorskip("openai")
    rdzv = free_port()
    logs = [str(tmp_path / f"node{n}.log") for n in range(2)]
    nodes = []
    try:
        for n in range(2):
            args = ["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--master-addr",
                    "127.0.0.1", "--master-port", str(rdzv), "--max-restarts", "0",
                    "-m", "tinyinfer.serve", "--ckpt", LLAMA, "--device", "cpu", "--port", "0",
                    "--tensor-parallel-size", "2", "--max-kv-tokens", "2048"]
            nodes.append(Node(args, logs[n]))
        text = wait_for(nodes[0], "tinyinfer: serving", LAUNCH_S)
        url = text.split("tinyinfer: serving", 1)[1].split(" at ", 1)[1].split()[0]    # .../v1
        client = openai.OpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
        one = LLM(LLAMA, device="cpu", max_kv_tokens=256)
        for prompt in PROMPTS:
            got = client.completions.create(model="shakespeare-llama", prompt=prompt, max_tokens=16,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert got.choices[0].text == one.generate([prompt], GREEDY)[0].text
        assert _get(url.replace("/v1", "/health")).status_code == 200

        # kill -9 rank 1 (node 1's only worker) while a long generation streams
        said = text.split("rank 1: host ", 1)[1].split()          # rank 0 names it: "vm, pid 123"
        rank1 = [int(said[2])]
        assert said[0] == socket.gethostname() + "," and rank1 == nodes[1].workers(), (said, nodes[1].pids)
        ended = threading.Event()

        def stream() -> None:
            try:
                for _ in client.completions.create(model="shakespeare-llama", prompt="ROMEO:",
                                                   max_tokens=1000, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True}):
                    pass
            except Exception:                              # noqa: BLE001 -- the error is the point
                pass
            ended.set()
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        time.sleep(1.0)
        assert not ended.is_set(), "the generation ended before the kill"
        killed = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        bound = torchrun.LOST_S + 5.0                   # docs/tensor-parallel.md: LOST_S + beats
        named = f"rank 1 (host {socket.gethostname()}, pid {rank1[0]})"
        while named not in (health := _get(url.replace("/v1", "/health"))).text:
            assert time.monotonic() - killed < bound, f"/health does not name rank 1: {health.text}"
            time.sleep(0.2)
        assert health.status_code == 503
        assert ended.wait(bound), "the stream did not end"
        assert time.monotonic() - killed < bound
        assert not nodes[1].wait_gone(30), "node 1 left processes"
        os.kill(nodes[0].proc.pid, signal.SIGINT)          # Ctrl-C on node 0's torchrun
        assert not nodes[0].wait_gone(45), f"node 0 left processes:\n{nodes[0].text()}"
    finally:
        for node in nodes:
            node.kill()


def test_serve_under_torchrun_standalone_and_a_killed_agent_leaves_no_rank(tmp_path):
    openai = pytest.importorskip("openai")
    args = ["-m", "tinyinfer.serve", "--ckpt", MLA, "--device", "cpu", "--port", "0",
            "--tensor-parallel-size", "2", "--max-kv-tokens", "1024"]
    node = Node(_standalone(args), str(tmp_path / "log"))
    try:
        text = wait_for(node, "tinyinfer: serving", LAUNCH_S)
        url = text.split("tinyinfer: serving", 1)[1].split(" at ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
        got = client.completions.create(model="shakespeare-mla", prompt=PROMPTS[1], max_tokens=16,
                                        temperature=0, extra_body={"ignore_eos": True})
        one = LLM(MLA, device="cpu", max_kv_tokens=256)
        assert got.choices[0].text == one.generate([PROMPTS[1]], GREEDY)[0].text
        ranks = node.workers()
        assert len(ranks) >= 2, node.pids
        client.close()                 # no open connection for the server's graceful shutdown to wait on
        node.proc.kill()                                   # the agent dies without a word
        node.proc.wait(10)
        assert not node.wait_gone(45), f"ranks outlived their agent:\n{node.text()}"
    finally:
        node.kill()
