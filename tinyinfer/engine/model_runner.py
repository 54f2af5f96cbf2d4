"""The model runner: a model, its paged KV cache and its CUDA graphs, executing one step's batch.

`execute(batch)` takes a `StepBatch` (engine/batch.py: plain host lists, so a runner can live in another
process) and returns float32 logits; it never touches a `Sequence` -- the engine advances their cached
counts after the step. Decode steps (one new token per sequence) replay CUDA graphs on a GPU, and so do
speculative verify steps once `enable_verify_graphs(k + 1)` is called; every other step runs eagerly.
The cache is sized once at load: a token budget (given, or engine/kv_cache.py's byte budget) cut into blocks
(Kwon et al., "PagedAttention", SOSP 2023). A tensor-parallel rank's runner (`shard`) holds that rank's
shard and KV heads; its ranks agree on the number of blocks (engine/tensor_parallel.py drives them).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from tinyinfer.config.model import ModelConfig
from tinyinfer.engine.batch import StepBatch
from tinyinfer.engine.cuda_graphs import GraphRunner
from tinyinfer.engine.kv_cache import PagedKVCache, check_kv_cache_dtype, check_pool_fits, pool_tokens
from tinyinfer.loading.checkpoint import CheckpointFiles
from tinyinfer.loading.shard import Shard
from tinyinfer.loading.weights import load_model
from tinyinfer.models.transformer import Transformer
from tinyinfer.sampling.sampler import sample_in_step


class ModelRunner:
    def __init__(self, model: Transformer, kv: PagedKVCache, cuda_graphs: bool = False,
                 graph_pool: Optional[tuple] = None):
        self.model, self.kv = model, kv
        self.config: ModelConfig = model.cfg
        self.device = kv.k_caches[0].device
        self.dtype = kv.dtype                # the model's; the cache's own may be fp8 / int8
        self.block_size, self.num_blocks = kv.block_size, kv.num_blocks
        # q_len -> graphs of steps with up to q_len new tokens per sequence (1: decode).
        self.graphs: dict[int, GraphRunner] = {}
        if cuda_graphs:
            self.graphs[1] = GraphRunner(model, kv, pool=graph_pool)
        # keep_hidden (an MTP draft, engine/mtp_proposer.py): each eager pass keeps its batch and
        # the model's hidden states (T, hidden), as last_batch / last_hidden.
        self.keep_hidden, self.last_batch, self.last_hidden = False, None, None

    @classmethod
    def load(cls, files: CheckpointFiles, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
             quant: Optional[str] = None, kv_tokens: Optional[int] = None, block_size: int = 16,
             cuda_graphs: bool = False, graph_pool: Optional[tuple] = None,
             say: Callable[[str], None] = lambda msg: None, group_size: int = 128,
             shard: Optional[Shard] = None, kv_memory: Optional[int] = None,
             max_num_seqs: int = 256, kv_cache_dtype: str = "auto") -> "ModelRunner":
        """Load the checkpoint's model on `device` (quant="int4": quantized at `group_size`) and
        allocate its KV cache: kv_tokens tokens, or when None `kv_memory` bytes (None: the default
        budget), at most max_context x max_num_seqs tokens (engine/kv_cache.py: the rule); with
        `shard`: that rank's shard, and the fewest tokens any rank holds. kv_cache_dtype "fp8" /
        "int8" quantizes the cache (docs/kv-cache.md)."""
        check_kv_cache_dtype(kv_cache_dtype)
        model = load_model(files, cfg, dtype, device, quant, group_size, say=say, shard=shard)
        k_dims, v_dims = Transformer.kv_dims(model.cfg)
        per_token = PagedKVCache.bytes_per_token(cfg.num_layers, k_dims, v_dims, dtype, kv_cache_dtype)
        if kv_tokens is None:
            kv_tokens = max(block_size, pool_tokens(device, per_token, cfg.max_context, max_num_seqs,
                                                    kv_memory))
            if shard is not None and shard.group is not None:
                kv_tokens = shard.group.min(kv_tokens, device)
        if kv_tokens < block_size:
            raise ValueError(f"max_kv_tokens={kv_tokens} is smaller than one block ({block_size} tokens)")
        num_blocks = kv_tokens // block_size
        check_pool_fits(device, num_blocks * block_size * per_token)
        kv = PagedKVCache(cfg.num_layers, num_blocks, block_size, k_dims, v_dims, dtype, device,
                          kv_cache_dtype)
        each = "" if shard is None else f" on each of {shard.size} ranks"
        kind = "" if kv_cache_dtype == "auto" else f" {kv_cache_dtype}"
        say(f"KV cache{kind}: {num_blocks} blocks x {block_size} = {num_blocks * block_size} tokens "
            f"({num_blocks * block_size * per_token / 2**20:.1f} MiB, {per_token} bytes/token{each})")
        return cls(model, kv, cuda_graphs, graph_pool)

    @property
    def graph_pool(self) -> Optional[tuple]:
        """The memory pool every graph of this runner shares (a draft model's runner may share it)."""
        return self.graphs[1].pool if 1 in self.graphs else None

    def enable_verify_graphs(self, q_len: int) -> None:
        """Capture steps of up to q_len new tokens per sequence too (speculative verification)."""
        if 1 in self.graphs and q_len not in self.graphs:
            self.graphs[q_len] = GraphRunner(self.model, self.kv, q_len=q_len, pool=self.graph_pool)

    @torch.inference_mode()
    def execute(self, batch: StepBatch, all_logits: bool = False) -> Tensor:
        """float32 logits of the last new token of each sequence, (B, vocab), or of every new token,
        (T, vocab), when all_logits."""
        graphs = self._graphs_for(batch, all_logits)
        if graphs is not None:
            return graphs.run(batch)           # (T, vocab); a decode step has T == B
        input_ids, positions, meta = batch.to_device(self.device)
        hidden = self.model(input_ids, positions, meta, self.kv.layers())            # (T, hidden)
        if self.keep_hidden:
            self.last_batch, self.last_hidden = batch, hidden
        decode = len(batch.input_ids) == batch.num_seqs and batch.max_q_len == 1     # T == B
        if not all_logits and not decode:
            hidden = hidden[meta.query_start_loc[1:].long() - 1]                     # (B, hidden)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute_sampled(self, batch: StepBatch) -> tuple[Tensor, Tensor, Tensor]:
        """One step that also draws each sequence's next token from its last row, as the sampler
        would for temperature-only requests (batch.sampling: temperature, seed, output position per
        sequence): (logits (B, vocab), tokens (B,) int64, finite (B,) bool). On a GPU the decode graph
        samples, so the host receives B token ids instead of B x vocab logits."""
        temps, seeds, steps = batch.sampling
        mode = "greedy" if not any(temps) else "sample"
        graphs = self._graphs_for(batch, all_logits=False)
        if graphs is not None:
            return graphs.run(batch, mode)
        logits = self.execute(batch)                                                  # (B, vocab)
        dev = logits.device
        keys = None if mode == "greedy" else (torch.tensor(temps, dtype=torch.float32, device=dev),
                                              torch.tensor(seeds, device=dev),
                                              torch.tensor(steps, device=dev))
        return (logits, *sample_in_step(logits, keys))

    def _graphs_for(self, batch: StepBatch, all_logits: bool) -> Optional[GraphRunner]:
        if not all_logits:
            runner = self.graphs.get(1)
        else:
            runner = next((g for q, g in sorted(self.graphs.items()) if q > 1), None)
        return runner if runner is not None and runner.can_run(batch) else None
