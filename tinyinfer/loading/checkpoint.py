"""Finding and reading checkpoint weights (safetensors, memory-mapped, read lazily tensor by tensor).

Accepted layouts:
  * a Hugging Face directory: config.json + model.safetensors, or shards listed in
    model.safetensors.index.json (+ generation_config.json, tokenizer files);
  * one .safetensors file with config.json (and a tokenizer) beside it, or with the config JSON in
    the file's metadata under "config".
  * a .gguf file (llama.cpp's format, loading/gguf.py): config, tokenizer and weights all inside.
Our module names are the Hugging Face names without the "model." prefix, except the fused
projections (qkv_proj = cat(q, k, v), gate_up_proj = cat(gate, up)), which are concatenated here, and
Mixtral's MoE block, which Hugging Face names block_sparse_moe with experts w1 (gate), w2 (down), w3 (up).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from tinyinfer.config.errors import CheckpointError, ConfigError
from tinyinfer.loading.gguf import GGUFCheckpoint, GGUFError, is_gguf, load_gguf


# Fused modules of ours -> the Hugging Face projections concatenated (along the output dim) to fill them.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Mixtral's Hugging Face names for our MoE modules (an expert's gate / up / down projections).
MIXTRAL_NAMES = {".mlp.gate.": ".block_sparse_moe.gate.", ".gate_proj.": ".w1.", ".up_proj.": ".w3.",
                 ".down_proj.": ".w2.", ".mlp.experts.": ".block_sparse_moe.experts."}


@dataclass
class CheckpointFiles:
    weight_files: list[str]
    config: dict
    generation_config: Optional[dict]
    tokenizer_dir: str
    metadata: dict = field(default_factory=dict)     # the first file's safetensors metadata
    gguf: Optional[GGUFCheckpoint] = None             # set for a .gguf file (weights_files = [it])


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix it") from None
    except RecursionError:                  # json.load recurses once per nesting level
        raise ConfigError(f"{path} nests its JSON deeper than Python's reader can follow; no model "
                          "config nests more than a few levels: fix or re-download it") from None


def _metadata(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupt safetensors file?)"
                              ) from None


def locate(path: str) -> CheckpointFiles:
    """Resolve a checkpoint path (directory, .safetensors or .gguf file) to its weight files and
    config."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist")
    if os.path.isfile(path) and (path.endswith(".gguf") or is_gguf(path)):
        try:
            gguf = load_gguf(path)
        except GGUFError as e:
            raise CheckpointError(str(e)) from None
        return CheckpointFiles([path], gguf.config, gguf.generation_config,
                               os.path.dirname(os.path.abspath(path)), gguf=gguf)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = (_read_json(index) or {}).get("weight_map", {})
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise CheckpointError(f"shard {missing[0]!r} listed in {index} is missing")
        else:
            files = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"directory {path!r} holds no .safetensors weights "
                                  "(tinyinfer reads safetensors; convert .bin/.pth checkpoints first)")
        config_dir = path
    elif path.endswith(".safetensors"):
        files, config_dir = [path], os.path.dirname(os.path.abspath(path))
    else:
        raise CheckpointError(f"{path!r} is neither a directory nor a .safetensors or .gguf file")
    meta = _metadata(files[0])
    config_path = os.path.join(config_dir, "config.json")
    config = _read_json(config_path)
    if "config" in meta:                       # self-describing single file wins over a sibling
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"config in the metadata of {files[0]} is not JSON: {e}") from None
    if config is None and not os.path.exists(config_path) and "config" not in meta:
        raise CheckpointError(f"no config.json beside {path!r} and no 'config' in its metadata")
    gen = _read_json(os.path.join(config_dir, "generation_config.json"))
    return CheckpointFiles(files, config, gen, config_dir, meta)


class TensorReader:
    """Lazy, memory-mapped access to every tensor of a (possibly sharded) checkpoint."""

    def __init__(self, files: list[str]):
        self.where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(f, framework="pt")
                names = list(handle.keys())
            except Exception as e:
                raise CheckpointError(f"cannot read {f}: {e} (truncated or corrupt?)") from None
            for name in names:
                if name in self.where:           # two shards holding one tensor: which one is meant?
                    raise CheckpointError(f"tensor {name} is in both {self.where[name]} and {f}; "
                                          "remove the stale copy")
                self.where[name] = f
            self._handles[f] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        try:
            return self._handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.where[name]}: {e} "
                                  "(truncated or corrupt file?)") from None

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (F32, BF16, I8, ...), without reading the data."""
        return self._handles[self.where[name]].get_slice(name).get_dtype()

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Only rows (dim 0) or columns (dim 1) [start, stop) of tensor `name`, read lazily from the
        memory-mapped file (safetensors' get_slice): a tensor-parallel rank reads its shard alone."""
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        try:
            part = self._handles[self.where[name]].get_slice(name)
            return part[start:stop] if dim == 0 else part[:, start:stop]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.where[name]}: {e} "
                                  "(truncated or corrupt file?)") from None


def hf_name(name: str, arch: Optional[str] = None) -> str:
    """Our parameter name -> the Hugging Face tensor name it comes from (fused ones excluded);
    `arch` (the config's architecture) picks family-specific names (Mixtral's MoE block)."""
    if name.startswith("lm_head."):
        return name
    name = "model." + name.replace(".attn.", ".self_attn.")
    if arch == "MixtralForCausalLM" and ".mlp." in name:
        for ours, theirs in MIXTRAL_NAMES.items():
            name = name.replace(ours, theirs)
    return name


def hf_sources(name: str, arch: Optional[str] = None) -> list[str]:
    """The Hugging Face tensors concatenated (dim 0) into our parameter `name`."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [hf_name(name.replace(fused, p), arch) for p in parts]
    return [hf_name(name, arch)]


def mtp_layers(names: Iterable[str], num_layers: int, num_mtp: int) -> set[int]:
    """DeepSeek-V3's multi-token-prediction layers: the indices num_layers .. num_layers + num_mtp - 1
    that hold an eh_proj (the MTP block's own projection). The main model does not run them; draft="mtp"
    loads the first as a draft (loading/mtp.py)."""
    names = list(names)
    return {i for i in range(num_layers, num_layers + num_mtp)
            if any(f"layers.{i}.eh_proj." in n for n in names)}


def _benign_extra(name: str, tied: bool, mtp: set[int]) -> bool:
    if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
        return True
    parts = name.split(".")    # any other layer past the last is unexpected: config and weights disagree
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) in mtp


def fill_parameters(model: torch.nn.Module, reader: TensorReader, device: torch.device,
                    progress: bool = False) -> set[str]:
    """Fill each parameter of `model` from its Hugging Face tensor(s) (shapes checked); returns the
    tensor names read. (Our name `layers.N.x` is the checkpoint's `model.layers.N.x`.)"""
    used: set[str] = set()
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=True)]
    arch = getattr(getattr(model, "cfg", None), "architecture", None)
    bar = _progress(params, progress)
    for name, param in bar:
        sources = hf_sources(name, arch)
        for s in sources:
            if s not in reader:
                raise CheckpointError(f"checkpoint lacks {s} (needed for {name})")
        expected_rows = 0
        parts = []
        for s in sources:
            shape = reader.shape(s)
            parts.append((s, shape))
            expected_rows += shape[0] if shape else 0
        want = list(param.shape)
        got = [expected_rows] + parts[0][1][1:] if len(parts) > 1 else parts[0][1]
        if got != want:
            detail = ", ".join(f"{s} {shape}" for s, shape in parts)
            raise CheckpointError(f"tensor {detail} has shape {got}, model expects {want} for "
                                  f"{name} (does config.json match the weights?)")
        with torch.no_grad():
            row = 0
            for s, shape in parts:
                t = reader.get(s)
                # param.dtype: the model dtype, except modules kept in float32 (MoE router)
                param.data[row:row + shape[0]].copy_(t.to(device=device, dtype=param.dtype))
                row += shape[0]
        used.update(sources)
    return used


def load_weights(model: torch.nn.Module, reader: TensorReader, num_layers: int, tied: bool,
                 dtype: torch.dtype, device: torch.device, progress: bool = False) -> None:
    """Fill every parameter of `model` (allocated on `device`) from the checkpoint, checking names
    and shapes; tensors the model does not use are an error unless known to be harmless."""
    used = fill_parameters(model, reader, device, progress)
    mtp = mtp_layers(reader.where, num_layers, getattr(getattr(model, "cfg", None), "num_mtp_layers", 0))
    extra = sorted(n for n in reader.where if n not in used and not _benign_extra(n, tied, mtp))
    if extra:
        raise CheckpointError(f"checkpoint holds {len(extra)} tensor(s) the model does not use, "
                              f"e.g. {extra[0]} (wrong architecture or config?)")


def _progress(items: list, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm import tqdm
    return iter(tqdm(items, desc="loading weights", unit="tensor", leave=False))
