"""Tensor parallelism's failures and shutdown (CPU, gloo, N = 2), and its refusals.

A worker killed in the middle of a generation stops the engine with an error naming its rank, within a
bounded time (the generation runs in a thread joined with a deadline: a hang fails the test instead of
stalling it); a worker that raises is reported with its message; close(), leaving a `with` block, Ctrl-C
on the CLI and the death of the engine's process leave no worker behind (checked in /proc). Models
that cannot be split, more ranks than GPUs, INT4 shards that would split a quantization group, and
checkpoint formats that load on one device only are refused before any process starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from hf_util import LLAMA, REPO
from tinyinfer import LLM, SamplingParams
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.tensor_parallel import TensorParallelError, check_devices
from tinyinfer.loading.checkpoint import CheckpointFiles, TensorReader, locate
from tinyinfer.loading.shard import ShardedReader, check_files, check_int4_shards, check_shardable
from tinyinfer.quant.io import save_int4

if not os.path.isdir("/proc/self"):
    pytest.skip("the process checks read /proc (Linux)", allow_module_level=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=800, ignore_eos=True)
DEADLINE_S = 60              # a failure must surface well within this (a hang fails the test)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...], or None for no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _gone(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"           # exited (a zombie has exited too)


def _descendants(pid: int) -> list[int]:
    parent = {int(d): _stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    parent = {p: int(st[1]) for p, st in parent.items() if st is not None}
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


def test_a_killed_worker_stops_the_engine_naming_its_rank_and_leaves_no_process():
    llm = LLM(LLAMA, device="cpu", tensor_parallel_size=2, max_kv_tokens=4096)
    [pid] = llm.engine.runner.worker_pids
    started, result = threading.Event(), {}

    def generate() -> None:
        try:
            llm.generate(["ROMEO:"] * 4, LONG, on_token=lambda delta: started.set())
        except BaseException as err:            # noqa: B036 -- handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    assert started.wait(DEADLINE_S)
    os.kill(pid, signal.SIGKILL)                 # in the middle of the generation's steps
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "the engine did not notice its dead worker"
    err = result.get("error")
    assert isinstance(err, TensorParallelError), err
    assert err.rank == 1 and "rank 1" in str(err) and "SIGKILL" in str(err)
    assert _gone(pid)
    with pytest.raises(TensorParallelError, match="rank 1"):      # the engine stays stopped
        llm.generate(["ROMEO:"], GREEDY)
    llm.close()


def test_a_worker_that_raises_is_reported_with_its_message_and_the_with_block_cleans_up():
    with LLM(LLAMA, device="cpu", tensor_parallel_size=2, max_kv_tokens=256) as llm:
        pids = llm.engine.runner.worker_pids
        assert len(llm.generate(["ROMEO:"], GREEDY)[0].token_ids) == 8
        llm.engine.runner.conns[0].send(("no_such_command",))   # the worker raises on it
        with pytest.raises(TensorParallelError,
                           match=r"rank 1 \(pid \d+\) raised ValueError: unknown tensor-parallel"):
            llm.generate(["ROMEO:"], GREEDY)
    assert _wait_gone(pids, 10)


def test_close_leaves_no_worker():
    llm = LLM(LLAMA, device="cpu", tensor_parallel_size=2, max_kv_tokens=256)
    pids = llm.engine.runner.worker_pids
    assert len(llm.generate(["ROMEO:"], GREEDY)[0].token_ids) == 8
    llm.close()
    assert all(_gone(p) for p in pids)           # close() joins them: gone at once


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_ctrl_c_or_the_death_of_the_cli_leaves_no_worker(sig, code):
    cmd = [sys.executable, "-m", "tinyinfer.generate", "--ckpt", LLAMA, "--device", "cpu",
           "--tensor-parallel-size", "2", "--temperature", "0", "--ignore-eos",
           "--max-new-tokens", "900", "--prompt", "ROMEO:"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(12)                # the prompt, then generated text: it is running
        workers = _descendants(proc.pid)
        assert workers, "no worker process was started"
        proc.send_signal(sig)
        assert proc.wait(DEADLINE_S) == code
        if sig == signal.SIGINT:
            assert b"interrupted" in proc.stderr.read()
        assert _wait_gone(workers, DEADLINE_S), "a worker outlived the engine's process"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sizes_the_model_cannot_be_split_into_are_refused_before_any_process_starts():
    cfg = ModelConfig.from_dir(LLAMA)                    # 4 heads, 2 KV heads, vocab 1024, FFN 768
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\)"):
        LLM(LLAMA, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        check_shardable(cfg, 0)
    with pytest.raises(ValueError, match=r"vocab_size \(1022\)"):
        check_shardable(ModelConfig.from_hf({**locate(LLAMA).config, "vocab_size": 1022}), 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        check_shardable(ModelConfig.from_hf({**locate(LLAMA).config, "num_attention_heads": 6,
                                             "num_key_value_heads": 3, "head_dim": 32}), 2)
    with pytest.raises(ValueError, match=f"needs {torch.cuda.device_count() + 1} GPUs"):
        check_devices(torch.device("cuda"), torch.cuda.device_count() + 1)


def test_int4_shards_that_would_split_a_group_are_refused(tmp_path):
    cfg = ModelConfig.from_dir(LLAMA)
    check_int4_shards(cfg, 2, 128)                       # o_proj 256 -> 128 per rank: whole groups
    with pytest.raises(ValueError, match=r"o_proj \(256 x 256 -> 256 x 64 per rank\).*split its "
                                         "groups of 128"):
        LLM(LLAMA, device="cpu", quant="int4", tensor_parallel_size=4)
    # An INT4 file: rank 0 of 4 would read half a group of o_proj's two per row.
    one = LLM(LLAMA, device="cpu", dtype="float32", quant="int4", max_kv_tokens=16)
    path = str(tmp_path / "int4.safetensors")
    save_int4(one.model, path, locate(LLAMA).config, 128)
    reader = ShardedReader(TensorReader([path]), cfg, 0, 4)
    with pytest.raises(ValueError, match="would split an INT4 group of layers.0.attn.o_proj"):
        reader.get("layers.0.attn.o_proj.scales")


def test_each_rank_reads_its_slice_and_kv_heads_replicate_past_their_count():
    cfg, reader = ModelConfig.from_dir(LLAMA), TensorReader(locate(LLAMA).weight_files)
    shards = [ShardedReader(reader, cfg, r, 4) for r in range(4)]    # 4 ranks, 2 KV heads
    layer = "model.layers.1.self_attn."
    for name, dim in [(layer + "q_proj.weight", 0), (layer + "o_proj.weight", 1),
                      ("model.layers.1.mlp.down_proj.weight", 1), ("lm_head.weight", 0)]:
        parts = [s.get(name) for s in shards]
        assert all(list(p.shape) == s.shape(name) for p, s in zip(parts, shards))
        assert torch.equal(torch.cat(parts, dim), reader.get(name))
    k, d = reader.get(layer + "k_proj.weight"), cfg.head_dim
    for r, s in enumerate(shards):                       # ranks 0, 1 hold head 0; ranks 2, 3 head 1
        head = r * cfg.num_kv_heads // 4
        assert torch.equal(s.get(layer + "k_proj.weight"), k[head * d:(head + 1) * d])
    norm = "model.layers.1.input_layernorm.weight"
    assert all(torch.equal(s.get(norm), reader.get(norm)) for s in shards)


def test_gguf_and_gptq_checkpoints_are_refused_with_more_than_one_rank():
    gguf = CheckpointFiles(["model.gguf"], {}, None, ".", gguf=object())
    with pytest.raises(ValueError, match="GGUF files"):
        check_files(gguf, 2)
    check_files(gguf, 1)
    gptq = CheckpointFiles(["model.safetensors"], {"quantization_config": {"quant_method": "gptq"}},
                           None, ".")
    with pytest.raises(ValueError, match="GPTQ / AWQ"):
        check_files(gptq, 2)
