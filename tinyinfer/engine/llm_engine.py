"""`LLMEngine`: the online engine. Requests arrive and leave at any time; each `step()` is one
continuously batched step over every live request (Yu et al., "Orca", OSDI 2022): schedule
(engine/scheduler.py) -> execute (engine/sampling_step.py; engine/speculative.py with a draft) ->
process the outputs into one RequestDelta per request that progressed (docs/architecture.md walks it).

    engine = LLMEngine("models/shakespeare-llama")
    rid = engine.add_request("ROMEO:", SamplingParams(max_tokens=32))   # validated now: RequestError
    while engine.has_unfinished():
        for delta in engine.step():
            print(delta.request_id, delta.new_text, delta.finish_reason)
    engine.abort(rid)      # frees its KV blocks at once; no-op (False) for unknown / finished ids

Calls from several threads run one at a time (engine/locking.py). A request that fails inside the
engine (non-finite logits) ends alone with finish_reason "error". tensor_parallel_size=N splits the
model over N ranks (engine/tensor_parallel.py; `close()` stops them). `SamplingParams(structured=...)`
constrains a request's output to a JSON schema, regex, choice or grammar (engine/grammar.py).
"""
from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from tinyinfer.config.errors import RequestError
from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.batch import build_batch
from tinyinfer.engine.grammar import Grammars
from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.kv_cache import check_kv_cache_dtype, parse_bytes
from tinyinfer.engine.locking import serialized_calls
from tinyinfer.engine.model_runner import ModelRunner
from tinyinfer.engine.output import RequestDelta, TextStream
from tinyinfer.engine.proposers import Proposer
from tinyinfer.engine.request import Prompt, prompt_ids, validate_request
from tinyinfer.engine.sampling_step import StepOutput, run_step
from tinyinfer.engine.scheduler import ScheduledStep, Scheduler, check_limits
from tinyinfer.engine.sequence import Sequence
from tinyinfer.engine.speculative import (Speculator, check_draft_option, check_speculate_k,
                                          make_proposer)
from tinyinfer.engine.tensor_parallel import load_runner
from tinyinfer.loading import checkpoint as ckpt
from tinyinfer.loading.tokenizer import Tokenizer
from tinyinfer.loading.validate import resolve_device
from tinyinfer.loading.weights import check_quant, choose_dtype, has_int4_weights
from tinyinfer.sampling.params import SamplingParams


@dataclass
class _Request:
    seq: Sequence
    text: TextStream


@serialized_calls("add_request", "abort", "step", "has_unfinished", "logits", "close")
class LLMEngine:
    def __init__(self, path: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 quant: Optional[str] = None, draft: Optional[str] = None, speculate_k: int = 4,
                 max_kv_tokens: Optional[int] = None, block_size: int = 16, verbose: bool = False,
                 cuda_graphs: Optional[bool] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True,
                 enable_prefix_caching: bool = True, group_size: Optional[int] = None,
                 tensor_parallel_size: int = 1, kv_cache_memory: Optional[int | str] = None,
                 kv_cache_dtype: str = "auto"):
        check_quant(quant, group_size)
        check_kv_cache_dtype(kv_cache_dtype)
        kv_memory = None if kv_cache_memory is None else parse_bytes(kv_cache_memory)
        check_speculate_k(speculate_k)
        check_limits(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.device = resolve_device(device)           # ValueError: unknown or absent device
        self.verbose = verbose
        files = ckpt.locate(path)
        self.config = ModelConfig.from_hf(files.config, files.generation_config)
        for note in self.config.notes:
            self._say(note)
        check_draft_option(draft, files, self.config, tensor_parallel_size)   # before any work
        self.dtype = choose_dtype(self.config, self.device, dtype, has_int4_weights(files, quant))
        self.tokenizer = Tokenizer.for_checkpoint(files)
        # Decode steps replay CUDA graphs (default on for half precision on CUDA: fp32 attention runs
        # the reference op, which cannot be captured); cuda_graphs=False runs them eagerly.
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {self.device}; "
                             "leave it unset (or False) on the CPU")
        half = self.dtype in (torch.float16, torch.bfloat16)
        use_graphs = (self.device.type == "cuda" and half) if cuda_graphs is None else cuda_graphs
        runner = load_runner(path, files, self.config, tensor_parallel_size, self.device, self.dtype,
                             quant, max_kv_tokens, block_size, use_graphs, group_size or 128, self._say,
                             kv_memory=kv_memory, max_num_seqs=max_num_seqs,
                             kv_cache_dtype=kv_cache_dtype)
        self._setup(runner, self.tokenizer, max_num_seqs, max_num_batched_tokens,
                    enable_chunked_prefill, enable_prefix_caching)
        if draft is not None:
            self.set_speculator(make_proposer(draft, self, use_graphs, files), speculate_k)

    def _setup(self, runner: ModelRunner, tokenizer: Tokenizer, max_num_seqs: int = 256,
               max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True,
               enable_prefix_caching: bool = True) -> None:
        self.runner, self.tokenizer, self.config = runner, tokenizer, runner.config
        self.device, self.dtype, self.block_size = runner.device, runner.dtype, runner.block_size
        self.kv_tokens = runner.num_blocks * runner.block_size
        self.kv_cache_dtype = runner.kv.kv_cache_dtype
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens,
                                   enable_chunked_prefill)
        self.speculator: Optional[Speculator] = None
        self.requests: dict[str, _Request] = {}
        self._pending: list[RequestDelta] = []      # final deltas of aborted requests
        self._ids = itertools.count()
        eos = list(self.config.eos_token_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self.grammars = Grammars(tokenizer, self.config.vocab_size, eos)   # llguidance loads on first use

    @classmethod
    def from_runner(cls, runner: ModelRunner, tokenizer: Tokenizer, **options) -> "LLMEngine":
        """An engine around a model runner built elsewhere (benchmarks: random-weight models), with
        the scheduling options of __init__ (max_num_seqs, ..., enable_prefix_caching)."""
        engine = cls.__new__(cls)
        engine.verbose = False
        engine._setup(runner, tokenizer, **options)
        return engine

    def set_speculator(self, proposer: Proposer, k: int) -> Speculator:
        """Decode speculatively from now on: `proposer` drafts up to k tokens per step."""
        self.speculator = Speculator(self.runner, self.blocks, proposer, k)
        return self.speculator

    def failure(self) -> Optional[str]:
        """Why this engine can no longer run a step (a tensor-parallel rank lost), None while it can."""
        check = getattr(self.runner, "failure", None)
        return check() if check is not None else None

    def close(self) -> None:
        """Stop the model runner's worker processes (tensor parallelism): none is left after it."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"tinyinfer: {msg}", file=sys.stderr)

    @property
    def stats(self) -> dict:
        return {"preemptions": self.scheduler.num_preemptions, "free_blocks": self.blocks.num_free,
                "num_blocks": self.blocks.num_blocks, "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "prefix_cache_queries": self.blocks.queries,
                "prefix_cache_hits": self.blocks.hits,
                **(self.speculator.counts() if self.speculator is not None else {})}

    def figures(self) -> dict:
        """Figures for the CLI's summary line: the prefix-cache hit rate (of stats' token counts);
        with speculation the acceptance rate and tokens per target step."""
        fig = self.speculator.figures() if self.speculator is not None else {}
        if self.blocks.enable_caching:
            fig["prefix_cache_hit_rate"] = round(self.blocks.hits / max(1, self.blocks.queries), 4)
        return fig

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, stream: bool = True) -> str:
        """Queue a request; it joins the batch at the next step. Raises RequestError if it cannot run.
        stream=False: nobody reads its text before it ends, so without stop strings its deltas carry
        new_text "" until the final one, which carries the whole text (decoded once, not per token)."""
        params = params if params is not None else SamplingParams()
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use by an unfinished request")
        ids = prompt_ids(prompt, self.tokenizer)
        validate_request(ids, params, self.config, self.blocks)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(rid, ids, params, seed, tuple(self.config.eos_token_ids))
        if params.structured is not None:     # RequestError: it cannot compile, or a draft is on
            seq.matcher = self.grammars.matcher(params.structured, self.speculator is not None)
        self.requests[rid] = _Request(seq, TextStream(self.tokenizer, ids, params.stop or [],
                                                      params.skip_special_tokens, stream))
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """End a request now and free its KV blocks; its final delta (finish_reason "abort") comes
        with the next step. Unknown or already finished ids are a no-op: returns False."""
        req = self.requests.get(str(request_id))
        if req is None or req.seq.finished:
            return False
        self._finish(req, "abort")
        self._pending.append(self._delta(req, []))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestDelta]:
        """One engine step: schedule, execute (the model and the sampler), process the outputs."""
        deltas = self._take_pending()
        work = self.scheduler.schedule(self.speculator.k if self.speculator is not None else 0)
        if work:
            deltas += self._process(work.seqs, self._execute(work))
        return deltas

    def _take_pending(self) -> list[RequestDelta]:
        """The deltas of requests that ended between steps (aborts); their requests are forgotten."""
        deltas, self._pending = self._pending, []
        for d in deltas:
            self.requests.pop(d.request_id, None)
        return deltas

    def _execute(self, work: ScheduledStep) -> list[StepOutput]:
        """One StepOutput per scheduled sequence, in work.seqs' order (decodes first)."""
        if self.speculator is None:                 # one varlen batch: decodes + prefill chunks
            return run_step(self.runner, work.seqs, work.num_new)
        return self.speculator.execute(work)        # verify pass (or a plain step) + prefill chunks

    def _process(self, seqs: list[Sequence], outputs: list[StepOutput]) -> list[RequestDelta]:
        """Append each sequence's new tokens (stop conditions checked token by token), one delta per
        request that progressed; finished requests are forgotten."""
        deltas = []
        for seq, out in zip(seqs, outputs):
            req = self.requests[seq.request_id]
            if out.error is not None:
                self._finish(req, "error", out.error)
            else:
                self.blocks.commit(seq)             # its computed full blocks join the prefix cache
                if not out.tokens:
                    continue                        # a prompt chunk that did not reach its end
            new = []
            for tok in out.tokens:
                new.append(tok)
                if self._append(req, tok):          # nothing after a stop is emitted
                    break
            deltas.append(self._delta(req, new, None if out.logprobs is None else out.logprobs[:len(new)]))
            if seq.finished:
                del self.requests[seq.request_id]
        return deltas

    def _append(self, req: _Request, tok: int) -> bool:
        """Append one generated token; True if the request finished with it."""
        seq = req.seq
        seq.advance(tokens=[tok])
        can_stop = seq.num_outputs >= seq.params.min_tokens      # min_tokens: stops ignored before
        refused = seq.matcher.accept(tok) if seq.matcher is not None else None
        if refused is not None:                     # never under the grammar's mask; ends this request
            self._finish(req, "error", refused)
            return True
        if can_stop and tok in seq.stop_ids:        # eos / stop ids end the text, unrendered
            reason = "stop"
        elif req.text.push(tok, check_stops=can_stop):
            reason = "stop"                         # a stop string: the text was cut before it
        elif seq.matcher is not None and seq.matcher.done:
            reason = "stop"                         # the grammar is complete: nothing may follow
        else:
            reason = "length" if seq.num_outputs >= seq.params.max_tokens else None
        if reason is None:
            return False
        if req.text.finish():                       # text held back for an unfinished character
            reason = "stop"
        self._finish(req, reason)
        return True

    def _finish(self, req: _Request, reason: str, error: Optional[Exception] = None) -> None:
        self.scheduler.finish(req.seq, reason, error)
        req.seq.matcher = None
        if self.speculator is not None:
            self.speculator.forget(req.seq)

    def _delta(self, req: _Request, new_tokens: list[int], logprobs: Optional[list] = None
               ) -> RequestDelta:
        seq = req.seq
        return RequestDelta(seq.request_id, new_tokens, req.text.take(final=seq.finished),
                            seq.finished, seq.finish_reason, seq.error, new_logprobs=logprobs)

    # ------------------------------------------------------------------ teacher forcing
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One teacher-forced forward over `token_ids` (used exactly as given): (len, vocab) float32."""
        if not token_ids or len(token_ids) > self.config.max_context:
            raise RequestError(f"logits() needs 1..{self.config.max_context} tokens, "
                               f"got {len(token_ids)}")
        seq = Sequence("logits", list(token_ids), SamplingParams(max_tokens=1), 0)
        if not self.blocks.can_grow(seq, len(seq)):
            raise RequestError(f"{len(seq)} tokens need {self.blocks.blocks_needed(seq, len(seq))} KV "
                               f"blocks, only {self.blocks.num_free} are free")
        self.blocks.grow(seq, len(seq))
        try:
            return self.runner.execute(build_batch([seq], [len(seq)], self.block_size),
                                       all_logits=True)
        finally:
            self.blocks.free(seq)
