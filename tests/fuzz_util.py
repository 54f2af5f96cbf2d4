"""Test helpers for the fuzz-style suite (tests/test_fuzz.py): a tiny random Llama checkpoint in two
shards, and every mutation of it and of a request, each with the name its error must carry.

Checkpoint mutations: each config.json field (nested rope_parameters ones too) removed, 0, negative, a
string, huge, true, null; each tensor dropped, duplicated into the other shard, reshaped, recast; the
first shard truncated at random offsets. Request mutations: each SamplingParams field at and past its
limits, and prompts of every wrong type. A mutation is a (case id, how to apply it, the name its error
must carry) triple; applying one never raises (the code under test raises, later).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_util import LLAMA
from tinyinfer import SamplingParams, StructuredOutput

REMOVE = object()
CONFIG_VALUES = {"removed": REMOVE, "zero": 0, "negative": -1, "string": "x", "huge": 2**62,
                 "true": True, "null": None}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32", "attention_dropout": 0.0,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64},
}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for CONFIG."""
    c = CONFIG
    h, f, q, kv = c["hidden_size"], c["intermediate_size"], 4 * 16, 2 * 16
    shapes = {"model.embed_tokens.weight": (1024, h), "model.norm.weight": (h,), "lm_head.weight": (1024, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return shapes


def write_checkpoint(path, seed: int = 0) -> str:
    """A random 2-layer Llama (CONFIG) in two shards + index, config.json and the demo tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=gen) * (0.1 if len(s) == 2 else 0.05) + (len(s) == 1))
               for n, s in tensor_shapes().items()}
    os.makedirs(path, exist_ok=True)
    save_shards(str(path), tensors)
    write_config(path, CONFIG)
    shutil.copy(os.path.join(LLAMA, "tokenizer.model"), path)
    return str(path)


def save_shards(path: str, tensors: dict[str, torch.Tensor], duplicate: Optional[str] = None) -> None:
    """Layer tensors in shard 1, the rest in shard 2; `duplicate` in both."""
    first = {n: t for n, t in tensors.items() if ".layers." in n or n == duplicate}
    second = {n: t for n, t in tensors.items() if ".layers." not in n or n == duplicate}
    for name, part in zip(SHARDS, (first, second)):
        save_file({n: t.contiguous() for n, t in part.items()}, os.path.join(path, name))
    weight_map = {n: SHARDS[1] for n in second} | {n: SHARDS[0] for n in first}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, fh)


def load_shards(path: str) -> dict[str, torch.Tensor]:
    return {n: t for f in SHARDS for n, t in load_file(os.path.join(path, f)).items()}


def write_config(path, cfg: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


@dataclass
class Mutation:
    case: str                                     # the test id
    apply: Callable[[str], None]                  # mutates the checkpoint copy at this path
    name: str                                     # what its error must name (field or tensor)


def config_mutations() -> list[Mutation]:
    out = []
    fields = [(k, None) for k in CONFIG] + [(k, "rope_parameters") for k in CONFIG["rope_parameters"]]
    for key, parent in fields:
        for label, value in CONFIG_VALUES.items():
            def apply(path, key=key, parent=parent, value=value):
                cfg = json.loads(json.dumps(CONFIG))
                target = cfg[parent] if parent else cfg
                if value is REMOVE:
                    del target[key]
                else:
                    target[key] = value
                write_config(path, cfg)
            out.append(Mutation(f"config-{parent + '.' if parent else ''}{key}-{label}", apply, key))
    return out


def _edit(name: str, fn: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]]) -> Callable:
    """A mutation of one tensor: fn(t) replaces it (None drops it); no fn: duplicated in both shards."""
    def apply(path):
        tensors = load_shards(path)
        if fn is None:
            return save_shards(path, tensors, duplicate=name)
        new = fn(tensors.pop(name))
        save_shards(path, tensors if new is None else {**tensors, name: new})
    return apply


def tensor_mutations() -> list[Mutation]:
    edits = {"dropped": lambda x: None, "duplicated": None, "one-row-less": lambda x: x[:-1],
             "flattened": lambda x: x.reshape(-1, 1),
             "transposed": lambda x: x.t() if x.dim() == 2 else x.reshape(1, -1)}
    for dtype in (torch.int8, torch.int32, torch.uint8, torch.bool, torch.float16, torch.float64):
        edits[str(dtype).removeprefix("torch.")] = lambda x, d=dtype: x.to(d)
    return [Mutation(f"tensor-{name.removeprefix('model.')}-{label}", _edit(name, fn), name)
            for name in sorted(tensor_shapes()) for label, fn in edits.items()]


def truncations(count: int, seed: int) -> list[Mutation]:
    """The first shard cut inside its 8-byte length, its JSON header, at the end of the header, and at
    `count` random offsets into the data."""
    rng = random.Random(seed)
    where = [("in-length", 0, 5), ("in-header", 0.5, None), ("at-data-start", 1.0, None)]
    where += [(f"in-data-{f:.4f}", f, None) for f in sorted(rng.random() for _ in range(count))]

    def cut(frac: float, exact: Optional[int], header_only: bool):
        def apply(path):
            file = os.path.join(path, SHARDS[0])
            head = 8 + int.from_bytes(open(file, "rb").read(8), "little")
            size = os.path.getsize(file)
            n = exact if exact is not None else (int(8 + frac * (head - 8)) if header_only
                                                 else int(head + frac * (size - head)))
            with open(file, "r+b") as fh:
                fh.truncate(min(n, size - 1))
        return apply
    return [Mutation(f"truncated-{label}", cut(frac, exact, label.startswith("in-header")), SHARDS[0])
            for label, frac, exact in where]


# --------------------------------------------------------------------------------------- requests

# field -> (values at the limits: accepted and run, values past them: refused naming the field)
LIMITS: dict[str, tuple[list[Any], list[Any]]] = {
    "temperature": ([0.0, 1e-6, 1e300, 2.0], [-1e-9, 1e-7, math.nan, math.inf, "1", True, None]),
    "top_k": ([0, 1, 1023, 10**30], [-1, 1.5, True, "3", None]),
    "top_p": ([1.0, 5e-324, 0.5], [0.0, -0.1, 1.0000001, math.nan, "0.5"]),
    "min_p": ([0.0, 1.0, 5e-324], [-1e-9, 1.01, math.nan, None]),
    "repetition_penalty": ([1e-6, 1e6, 1.0], [0.0, -1.0, 9.9e-7, 1.1e6, math.inf, math.nan]),
    "seed": ([None, 0, 2**63 - 1, -2**63], [2**63, -2**63 - 1, 2**70, 1.5, True, "1"]),
    "max_tokens": ([1, 4], [0, -1, 1.5, True, None, 10**30]),
    "stop": ([None, [], "x", ["\n", "ROMEO"], "y" * 1000], [[""], "", [1], 5, b"x"]),
    "stop_token_ids": ([None, [], [0], [1023], [np.int64(3)]], [[-1], [1024], [True], ["1"], 5]),
    "ignore_eos": ([True, False], [1, "yes", None]),
    "min_tokens": ([0, 4], [-1, 5, 1.5, None]),
    "logprobs": ([None, 0, 20], [-1, 21, 1.5, True]),
    "skip_special_tokens": ([True, False], [1, None]),
    "structured": ([None, StructuredOutput(choice=["ROMEO", "JULIET"])],
                   ["json", {"type": "json_object"}, 5, True]),
}


def params_cases() -> list[tuple[str, str, Any, bool]]:
    """(case id, field, value, accepted) for every value of LIMITS."""
    return [(f"{field}-{'ok' if ok else 'bad'}-{str(value)[:24]!r}", field, value, ok)
            for field, (good, bad) in LIMITS.items() for ok, values in ((True, good), (False, bad))
            for value in values]


def mutated_params(field: str, value: Any) -> SamplingParams:
    """Valid params of 4 tokens with `field` assigned `value` after construction (so the engine's own
    check is what refuses it)."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    setattr(params, field, value)
    return params


BAD_PROMPTS = {"none": None, "int": 7, "float": 1.5, "bytes": b"ROMEO", "dict": {"a": 1},
               "set": {5, 6}, "empty_text": "", "empty_list": [], "none_id": [5, None],
               "nested": [[5, 6]], "bool_id": [True, 5], "float_id": [5, 6.5], "str_id": [5, "6"],
               "negative_id": [5, -1], "huge_id": [5, 2**70], "vocab_id": [1024],
               "numpy_float": np.array([5.0, 6.0]), "numpy_2d": np.array([[5, 6]]),
               "numpy_bool": np.array([True]), "torch_float": torch.tensor([5.0]),
               "torch_bool": torch.tensor([True]), "too_long": [5] * 1100}
