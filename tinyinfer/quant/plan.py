"""Which linears of a model become INT4, at which group size, and how many bytes the result takes: the
one plan that the quantizer (quantizer.py) follows and the memory tool (tinyinfer/memory) counts.

Rules. Every nn.Linear is quantized except the lm_head unless `quantize_head` (the embedding and the
MoE router are not nn.Linear and stay in the model dtype). A linear takes the requested group size G
when G divides its input width K, else the largest of 128 / 64 / 32 that does (SmolLM2's K = 576 is
not a multiple of 128: g64); one whose K no group size divides, or whose output width N is not a
multiple of 16 (the kernel layout's tile), stays dense and is named in a warning. With tied embeddings
and `quantize_head`, the head is quantized as a copy of the embedding (which stays dense).

Bytes, as `quant/io.py` writes them (canonical layout, ops/int4_format.py): per INT4 linear N*K/2 packed
bytes, N*K/G fp16 scales and N*K/G uint8 zeros, its bias in the model dtype; every other parameter
(tied ones once) in its own dtype (the model dtype; float32 for the MoE router).
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from tinyinfer.layers.linear import Int4Linear
from tinyinfer.ops.int4_format import GROUP_SIZES, TILE_N

SCALE_BYTES, ZERO_BYTES = 2, 1          # fp16 scale, uint8 zero point per group


def group_size_for(k: int, requested: int) -> int | None:
    """The requested group size if it divides K, else the largest of GROUP_SIZES that does."""
    if k % requested == 0:
        return requested
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if k % g == 0), None)


@dataclass
class Int4Plan:
    group_size: int                                            # the requested one
    groups: dict[str, int] = field(default_factory=dict)       # module -> its group size
    dense: dict[str, str] = field(default_factory=dict)        # linear kept dense -> why
    head_copy: bool = False        # a tied lm_head quantized as a copy of the embedding
    kept: list[str] = field(default_factory=list)              # already INT4 (GGUF, INT4 file)

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def summary(self) -> str:
        """How many linears took which group size, and which stayed dense (and why)."""
        counts = Counter(self.groups.values())
        parts = [f"g{g}: {counts[g]}" for g in sorted(counts, reverse=True)]
        line = f"INT4: {len(self.groups)} linears quantized ({', '.join(parts) or 'none'})"
        fallback = sum(n for g, n in counts.items() if g != self.group_size)
        if fallback:
            line += (f"; {fallback} took a smaller group size than g{self.group_size}, which does "
                     "not divide their input width")
        if self.kept:
            line += f"; {len(self.kept)} already INT4 as loaded (kept)"
        if self.head_copy:
            line += "; lm_head quantized as a copy of the tied embedding (the embedding stays dense)"
        if self.dense:
            line += f"; {len(self.dense)} kept dense: " + ", ".join(self.dense)
        return line


def plan_int4(model: nn.Module, group_size: int = 128, quantize_head: bool = False) -> Int4Plan:
    """The plan for `model` (any device, the meta device included); warns naming the linears that
    fit no group size."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
    tied = bool(getattr(getattr(model, "cfg", None), "tie_word_embeddings", False))
    plan = Int4Plan(group_size)
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            plan.kept.append(name)
        if not isinstance(module, nn.Linear):
            continue
        if name.split(".")[-1] == "lm_head":
            if not quantize_head:
                continue
            plan.head_copy = tied
        n, k = module.weight.shape
        g = group_size_for(k, group_size)
        if g is None:
            plan.dense[name] = f"input width {k} is not a multiple of 32"
        elif n % TILE_N:
            plan.dense[name] = f"output width {n} is not a multiple of {TILE_N}"
        else:
            plan.groups[name] = g
    if plan.dense:
        warnings.warn("INT4: " + "; ".join(f"{n} stays dense ({why})" for n, why in plan.dense.items()),
                      RuntimeWarning, stacklevel=2)
    return plan


def int4_linear_bytes(n: int, k: int, group_size: int) -> int:
    """Bytes of one INT4 weight (N, K) at `group_size`: packed levels + scales + zero points."""
    return n * k // 2 + n * (k // group_size) * (SCALE_BYTES + ZERO_BYTES)


def planned_bytes(model: nn.Module, plan: Int4Plan) -> tuple[int, int]:
    """(bytes of the INT4 weights, bytes of every other parameter in its own dtype) once `plan` is
    applied to `model` (built in the model dtype, any device: tied parameters counted once, a
    quantized tied head adds its INT4 copy)."""
    int4 = dense = 0
    for name, g in plan.groups.items():
        n, k = model.get_submodule(name).weight.shape
        int4 += int4_linear_bytes(n, k, g)
    quantized = {f"{name}.weight" for name in plan.groups}
    for name, p in model.named_parameters():             # remove_duplicate: a tied weight once
        if name not in quantized:
            dense += p.numel() * p.element_size()
    return int4, dense
