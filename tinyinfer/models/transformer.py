"""The transformer: one readable decoder for Llama-family and DeepSeek (MLA, MoE) checkpoints.

    embed -> N x [RMSNorm -> Attention -> +residual -> RMSNorm -> MLP -> +residual] -> RMSNorm -> lm_head

(Touvron et al., "LLaMA", 2023: pre-norm RMSNorm, SwiGLU, RoPE; DeepSeek-AI, "DeepSeek-V2", 2024: MLA and
MoE layers.) Each "+residual -> RMSNorm" pair is one op (ops.fused_add_rmsnorm, one CUDA kernel): a
layer hands on its sublayer's raw output together with the residual stream, and the next norm adds them.

Built on the meta device (no memory touched), then allocated on the target device and filled from the
checkpoint (loading/weights.py). Attention and MLP classes are chosen per layer by the config. The
rotary table is built once, by `build_model`, on the device.

Tensor parallelism (`group`, layers/parallel.py): built from one rank's slice of the config
(loading/shard.py: heads, FFN width and vocabulary divided by N), the same classes hold that rank's
shard; each layer all-reduces its attention and its MLP output (the row-parallel partial sums), the
embedding is vocabulary-parallel, and `compute_logits` gathers the vocabulary slices.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from tinyinfer.config.model import ModelConfig
from tinyinfer.layers.attention import AttentionMetadata, MultiHeadAttention
from tinyinfer.layers.linear import Linear
from tinyinfer.layers.mla import MultiHeadLatentAttention
from tinyinfer.layers.mlp import SwiGLU
from tinyinfer.layers.moe import MoE
from tinyinfer.layers.norm import RMSNorm, residual_stream
from tinyinfer.layers.parallel import ParallelGroup, VocabParallelEmbedding, all_reduce, gather_vocab
from tinyinfer.layers.rotary import RotaryEmbedding
from tinyinfer.models import fused_cpu
from tinyinfer.ops import reference

REFINED_TOP = 32          # logits per row recomputed in float32 on a half-precision path


def attention_class(cfg: ModelConfig) -> type[nn.Module]:
    return MultiHeadLatentAttention if cfg.is_mla else MultiHeadAttention


def make_mlp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.is_moe_layer(layer_idx):
        return MoE(cfg)
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, group: Optional[ParallelGroup] = None):
        super().__init__()
        self.group = group                   # tensor parallel: sums the ranks' partial outputs
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = attention_class(cfg)(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_mlp(cfg, layer_idx)

    def forward(self, x: Tensor, residual: Tensor | None, positions: Tensor, rotary: RotaryEmbedding,
                meta: AttentionMetadata, k_cache: Tensor, v_cache: Tensor | None,
                k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # x (T, hidden): the previous layer's MLP output (the embeddings for layer 0, residual None);
        # residual (T, hidden): the stream x is still to be added to. Returns this layer's pair.
        if residual is None:
            residual, h = residual_stream(x), self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = all_reduce(self.attn(h, positions, rotary, meta, k_cache, v_cache, k_scale, v_scale),
                       self.group)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return all_reduce(self.mlp(h), self.group), residual


class Transformer(nn.Module):
    fused_cpu_decode = True       # decode steps on a CPU in one C++ call where they can (fused_cpu.py)

    def __init__(self, cfg: ModelConfig, group: Optional[ParallelGroup] = None):
        super().__init__()
        self.cfg, self.group = cfg, group
        # The table is given (empty) rather than drawn: the checkpoint fills it, and drawing it on
        # the meta device imports torch's compiler stack (~100 MiB of resident memory, ~1.5 s).
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                          _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
                             if group is None else
                             VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, group) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary: Optional[RotaryEmbedding] = None        # set by build_model, on the device

    @staticmethod
    def kv_dims(cfg: ModelConfig) -> tuple[tuple[int, int], Optional[tuple[int, int]]]:
        return attention_class(cfg).kv_dims(cfg)

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[Tensor | None, ...]]) -> Tensor:
        # input_ids, positions (T,) -> hidden states (T, hidden); kv_caches: per layer (k_cache,
        # v_cache) or (k_cache, v_cache, k_scale, v_scale) (a quantized cache, engine/kv_cache.py)
        if self.fused_cpu_decode and input_ids.device.type == "cpu":
            hidden = fused_cpu.decode_step(self, input_ids, positions, meta, kv_caches)
            if hidden is not None:
                return hidden
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.rotary, meta, *cache)
        return self.norm(x) if residual is None else self.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden (n, hidden) -> (n, vocab) float32. In half precision the REFINED_TOP largest logits of
        # each row are recomputed in float32 (ops/reference.py refine_top_logits: greedy picks float32's
        # argmax of the same hidden state; docs/quality.md).
        logits = self.lm_head(hidden).float()
        if hidden.dtype in (torch.float16, torch.bfloat16) and isinstance(self.lm_head, Linear):
            logits = reference.refine_top_logits(hidden, self.lm_head.weight, logits, REFINED_TOP)
        return gather_vocab(logits, self.group)                         # (n, vocab)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                group: Optional[ParallelGroup] = None) -> Transformer:
    """Allocate an (uninitialised) model on `device` without ever materialising it on the CPU first
    (with `group`: this rank's shard, `cfg` being its slice of the model's config)."""
    with torch.device("meta"):
        model = Transformer(cfg, group)
    _materialize(model, device, dtype)
    if cfg.tie_word_embeddings:                  # to_empty allocates each module's tensors anew
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding.for_model(cfg, dtype, device)
    return model.eval()


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """model.to_empty(device).to(dtype), each tensor allocated once in its final dtype -- and without
    torch's meta-tensor decompositions, whose first use imports sympy (~1.3 s of a load on a 2-core
    machine). Floating tensors take `dtype`, except under a module marked keep_float32 (e.g. the MoE
    router: near-equal scores pick experts)."""
    fp32 = {id(sub) for m in model.modules() if getattr(m, "keep_float32", False) for sub in m.modules()}
    for m in model.modules():
        want = torch.float32 if id(m) in fp32 else dtype
        for table, wrap in ((m._parameters, True), (m._buffers, False)):
            for name, t in table.items():
                if t is None:
                    continue
                new = torch.empty(t.shape, dtype=want if t.is_floating_point() else t.dtype,
                                  device=device)
                table[name] = nn.Parameter(new, requires_grad=t.requires_grad) if wrap else new
