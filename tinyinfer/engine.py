"""`LLM`: the public API. Loads a checkpoint, owns the paged KV cache, and runs the engine loop:

    schedule -> build the flat batch (AttentionMetadata) -> model forward -> sample -> append / stop

Every request in a `generate` call runs as one continuously batched workload over the shared cache.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence as Seq, Union

import torch

from tinyinfer import checkpoint as ckpt
from tinyinfer import quant_io
from tinyinfer import speculative
from tinyinfer.attention import AttentionMetadata
from tinyinfer.config import ModelConfig, parse_dtype
from tinyinfer.cuda_graphs import GraphRunner
from tinyinfer.kv_cache import BlockAllocator, PagedKVCache
from tinyinfer.model import Transformer, build_model
from tinyinfer.sampling import SamplingParams, sample
from tinyinfer.scheduler import Scheduler, Sequence, Status
from tinyinfer.tokenizer import Tokenizer

Prompt = Union[str, list[int]]


class RequestError(ValueError):
    """A request cannot run (empty, too long for the context or the KV pool, non-finite logits)."""


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str                      # "stop" | "length" | "error"
    error: Optional[Exception] = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(self, path: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 quant: Optional[str] = None, draft: Optional[str] = None, speculate_k: int = 4,
                 max_kv_tokens: Optional[int] = None, block_size: int = 16, verbose: bool = False,
                 cuda_graphs: Optional[bool] = None):
        if quant not in (None, "int4"):
            raise ValueError(f"quant={quant!r} is not supported; use None or 'int4'")
        speculative.check_speculate_k(speculate_k)
        self.device = torch.device(device or default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
        self.verbose = verbose
        files = ckpt.locate(path)
        self.config = ModelConfig.from_hf(files.config, files.generation_config)
        for note in self.config.notes:
            self._say(note)
        if draft is not None:
            speculative.check_draft(draft, self.config)     # bad path / vocabulary: before any work
        # CPU: float32 (fast matmuls, exact parity); GPU: the checkpoint's own half precision.
        default = "float32" if self.device.type == "cpu" else (
            self.config.dtype if self.config.dtype in ("bfloat16", "float16") else "bfloat16")
        self.dtype = parse_dtype(dtype or default)
        self.tokenizer = Tokenizer.from_dir(files.tokenizer_dir)
        self.model = build_model(self.config, self.dtype, self.device)
        reader = ckpt.TensorReader(files.weight_files)
        big = sum(p.numel() for p in self.model.parameters()) * self.dtype.itemsize > (1 << 30)
        # INT4 files, GPTQ/AWQ directories and quant="int4" (convert after loading): quant_io.py
        quant_io.load_weights(self.model, files, reader, self.config.num_layers,
                              self.config.tie_word_embeddings, self.dtype, self.device, quant=quant,
                              progress=big)
        self.block_size = block_size
        self._init_cache(max_kv_tokens)
        # Decode steps replay CUDA graphs (default on CUDA); cuda_graphs=False runs them eagerly.
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {self.device}; "
                             "leave it unset (or False) on the CPU")
        # Default: on for half precision; fp32 attention runs the reference op, which cannot be captured.
        half = self.dtype in (torch.float16, torch.bfloat16)
        use_graphs = (self.device.type == "cuda" and half) if cuda_graphs is None else cuda_graphs
        self.graph_runner = GraphRunner(self.model, self.kv) if use_graphs else None
        self.speculator = None if draft is None else speculative.build(self, draft, speculate_k)

    @property
    def stats(self) -> dict:
        return {"preemptions": self.scheduler.num_preemptions,
                "free_blocks": self.allocator.num_free, "num_blocks": self.allocator.num_blocks}

    def figures(self) -> dict:
        """Figures for the CLI's summary line (speculation: acceptance rate, tokens per target step)."""
        return self.speculator.figures() if self.speculator is not None else {}

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"tinyinfer: {msg}", file=sys.stderr)

    # ------------------------------------------------------------------ KV cache sizing
    def _init_cache(self, max_kv_tokens: Optional[int]) -> None:
        cfg = self.config
        k_dims, v_dims = Transformer.kv_dims(cfg)
        per_token = PagedKVCache.bytes_per_token(cfg.num_layers, k_dims, v_dims, self.dtype)
        if max_kv_tokens is None:
            max_kv_tokens = self._default_kv_tokens(per_token)
        if max_kv_tokens < self.block_size:
            raise ValueError(f"max_kv_tokens={max_kv_tokens} is smaller than one block "
                             f"({self.block_size} tokens)")
        num_blocks = max_kv_tokens // self.block_size
        self.kv = PagedKVCache(cfg.num_layers, num_blocks, self.block_size, k_dims, v_dims,
                               self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(self.allocator, self.block_size)
        self.kv_tokens = num_blocks * self.block_size
        self._say(f"KV cache: {num_blocks} blocks x {self.block_size} = {self.kv_tokens} tokens "
                  f"({num_blocks * self.block_size * per_token / 2**20:.1f} MiB, "
                  f"{per_token} bytes/token)")

    def _default_kv_tokens(self, per_token: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.80)           # the rest: activations, CUDA graphs, workspace
        else:
            # CPU: a tenth of the available RAM, but no more than 64 full-context sequences need.
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(avail // 10, 64 * self.config.max_context * per_token)
        return max(self.block_size, budget // per_token)

    # ------------------------------------------------------------------ one engine step
    def _prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple:
        """Flat varlen batch: sequence i feeds its tokens [num_cached, num_cached + num_new[i])."""
        bs = self.block_size
        starts = [s.num_cached for s in seqs]
        ids = [t for s, st, n in zip(seqs, starts, num_new) for t in s.token_ids[st:st + n]]
        seq_lens = [st + n for st, n in zip(starts, num_new)]
        qsl = [0]
        for n in num_new:
            qsl.append(qsl[-1] + n)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [-1] * (max_blocks - len(s.block_table)) for s in seqs],
                              dtype=torch.int32)
        dev = self.device
        if all(n == 1 for n in num_new):
            # Decode: one token per sequence, so O(B) Python beats a dozen tensor ops (the engine's own
            # cost is what a small model's step is made of).
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, starts)]
            flat = torch.tensor([ids, starts, slots]).to(dev)                      # (3, B) int64
            small = torch.tensor(seq_lens + qsl, dtype=torch.int32).to(dev)        # (2B + 1,)
            meta = AttentionMetadata(
                slot_mapping=flat[2], block_tables=tables.to(dev), seq_lens=small[:len(seqs)],
                query_start_loc=small[len(seqs):], max_q_len=1, query_start_loc_host=qsl,
                prefill=all(st == 0 for st in starts))
            return flat[0], flat[1], meta
        counts = torch.tensor(num_new)
        seq_idx = torch.repeat_interleave(torch.arange(len(seqs)), counts)           # (T,)
        positions = torch.repeat_interleave(torch.tensor(starts), counts)
        positions += torch.arange(len(ids)) - torch.repeat_interleave(torch.tensor(qsl[:-1]), counts)
        slots = tables[seq_idx, positions // bs].long() * bs + positions % bs        # (T,)
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev), block_tables=tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev),
            max_q_len=max(num_new), query_start_loc_host=qsl, prefill=all(st == 0 for st in starts))
        return torch.tensor(ids, dtype=torch.long).to(dev), positions.to(dev), meta

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], num_new: list[int], all_logits: bool = False
                 ) -> torch.Tensor:
        runner = self.graph_runner
        if not all_logits and runner is not None and runner.can_run(seqs, num_new):
            logits = runner.run(seqs, num_new)          # (B, vocab): one new token per sequence
            for s in seqs:
                s.num_cached += 1
            return logits
        input_ids, positions, meta = self._prepare(seqs, num_new)
        hidden = self.model(input_ids, positions, meta, self.kv.layers())
        for s, n in zip(seqs, num_new):
            s.num_cached += n
        if not all_logits:
            hidden = hidden[meta.query_start_loc[1:].long() - 1]                    # (B, hidden)
        return self.model.compute_logits(hidden)

    def _step(self, on_token: Optional[Callable[[Sequence], None]]) -> None:
        # Speculative decode steps reserve cache slots for the drafts too (speculative.py).
        lookahead = self.speculator.k if self.speculator is not None else 0
        seqs, prefill = self.scheduler.schedule(lookahead=lookahead)
        if not seqs:
            return
        if self.speculator is not None and not prefill:
            return self.speculator.step(seqs, on_token)
        num_new = [len(s) - s.num_cached for s in seqs]
        logits = self._forward(seqs, num_new)                                       # (B, vocab)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens = sample(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                        [s.seed for s in seqs], [s.num_outputs for s in seqs]).tolist()
        for seq, tok, ok in zip(seqs, tokens, finite):
            if not ok:
                self.scheduler.finish(seq, "error", RequestError(
                    f"request {seq.id}: the model produced NaN/inf logits at output position "
                    f"{seq.num_outputs}; the request was stopped (its KV blocks were freed)"))
                continue
            self._append(seq, tok)
            if on_token is not None:
                on_token(seq)

    def _append(self, seq: Sequence, tok: int) -> None:
        seq.token_ids.append(tok)
        seq.detok_push(tok)
        p = seq.params
        if seq.stop_hit():
            self.scheduler.finish(seq, "stop")
            return
        reason = "stop" if tok in seq.stop_ids else "length" if seq.num_outputs >= p.max_tokens else None
        if reason is not None:
            seq.text += seq.detok.flush()           # text held back for an unfinished character
            if seq.stop_hit():
                reason = "stop"
            self.scheduler.finish(seq, reason)

    # ------------------------------------------------------------------ public API
    def _make_sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(ids, params, seed)
        seq.attach_text(self.tokenizer, self.config.eos_token_ids)
        limit = self.config.max_context
        if not ids or prompt == "":
            seq.error = RequestError("empty prompt: give at least one token or character")
        elif any(not isinstance(t, int) or not 0 <= t < self.config.vocab_size for t in ids):
            bad = next(t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size)
            seq.error = RequestError(f"prompt token id {bad!r} is outside the vocabulary "
                                     f"[0, {self.config.vocab_size})")
        elif len(ids) + params.max_tokens > limit:
            seq.error = RequestError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} = "
                f"{len(ids) + params.max_tokens} exceeds the model's context of {limit} tokens; "
                "shorten the prompt or lower max_tokens")
        elif -(-(len(ids) + params.max_tokens) // self.block_size) > self.allocator.num_blocks:
            seq.error = RequestError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} needs more KV cache "
                f"than the whole pool holds ({self.kv_tokens} tokens); raise max_kv_tokens or "
                "lower max_tokens")
        return seq

    def generate(self, prompts: Union[Prompt, Seq[Prompt]], params: Union[SamplingParams,
                 Seq[SamplingParams], None] = None,
                 on_token: Optional[Callable[[Sequence], None]] = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, plist)]
        for seq in seqs:
            if seq.error is None:
                self.scheduler.add(seq)
            else:
                seq.status, seq.finish_reason = Status.FINISHED, "error"
        try:
            while self.scheduler.has_work():
                self._step(on_token)
        finally:
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler.finish(seq, "error", RuntimeError("generation interrupted"))
        return [RequestOutput(s.prompt_ids, s.output_ids, s.text, s.finish_reason, s.error)
                for s in seqs]

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One teacher-forced forward over `token_ids` (used exactly as given): (len, vocab) float32."""
        seq = Sequence(list(token_ids), SamplingParams(max_tokens=1), 0)
        if not token_ids or len(token_ids) > self.config.max_context:
            raise RequestError(f"logits() needs 1..{self.config.max_context} tokens, "
                               f"got {len(token_ids)}")
        need = seq.blocks_needed(len(seq), self.block_size)
        if need > self.allocator.num_free:
            raise RequestError(f"{len(seq)} tokens need {need} KV blocks, only "
                               f"{self.allocator.num_free} are free")
        seq.block_table = self.allocator.allocate(need)
        try:
            return self._forward([seq], [len(seq)], all_logits=True)
        finally:
            self.allocator.release(seq.block_table)
