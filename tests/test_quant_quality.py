"""INT4 accuracy on held-out text: the demo shakespeare-llama, quantized, against itself unquantized.

Text: data/tinyshakespeare-val-slice.txt, a slice of the validation split the model was not trained on.
Each window of 256 tokens is one teacher-forced forward through tinyinfer (LLM.logits), float32 on the
CPU. Targets (issue 4): mean per-token KL(base || int4) <= 0.06 nats at g128 and <= 0.04 at g32, the
clipping search below plain min/max round-to-nearest at every group size, perplexity within 3 %.
"""
import copy
import math

import pytest
import torch

from tinyinfer import LLM
from tinyinfer.layers.linear import Int4Linear
from tinyinfer.quant.quantizer import quantize_model

LLAMA = "models/shakespeare-llama"
WINDOW, WINDOWS = 256, 12


@pytest.fixture(scope="module")
def evaluation():
    llm = LLM(LLAMA, device="cpu", dtype="float32")
    ids = llm.tokenizer.encode(open("data/tinyshakespeare-val-slice.txt").read())
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    assert len(windows[-1]) == WINDOW, "the held-out slice is too short"
    targets = torch.cat([torch.tensor(w[1:]) for w in windows])

    def logprobs(model) -> torch.Tensor:
        llm.engine.runner.model = model
        return torch.cat([llm.logits(w)[:-1].log_softmax(-1) for w in windows])

    base_model = llm.model
    base = logprobs(base_model)
    results = {}

    def measure(name: str, logp: torch.Tensor) -> None:
        results[name] = {
            "kl": (base.exp() * (base - logp)).sum(-1).mean().item(),
            "top1": (base.argmax(-1) == logp.argmax(-1)).float().mean().item(),
            "ppl": math.exp(-logp.gather(1, targets[:, None]).mean().item())}

    measure("base", base)
    for g in (32, 64, 128):
        for clip in (False, True):
            model = copy.deepcopy(base_model)
            quantize_model(model, group_size=g, clip_search=clip)
            measure(f"g{g}-{'clip' if clip else 'rtn'}", logprobs(model))
    # The user's path: LLM(quant="int4") converts on the fly with the defaults (g128, clip search).
    default = LLM(LLAMA, device="cpu", dtype="float32", quant="int4")
    assert isinstance(default.model.layers[0].mlp.down_proj, Int4Linear)
    measure("default", torch.cat([default.logits(w)[:-1].log_softmax(-1) for w in windows]))
    return results


def test_default_int4_is_the_g128_clip_search_model(evaluation):
    assert evaluation["default"]["kl"] == pytest.approx(evaluation["g128-clip"]["kl"], rel=1e-6)


def test_kl_divergence_within_targets(evaluation):
    assert evaluation["g128-clip"]["kl"] <= 0.06
    assert evaluation["g32-clip"]["kl"] <= 0.04


@pytest.mark.parametrize("g", [32, 64, 128])
def test_clip_search_beats_round_to_nearest(evaluation, g):
    assert evaluation[f"g{g}-clip"]["kl"] < evaluation[f"g{g}-rtn"]["kl"]


@pytest.mark.parametrize("g", [32, 64, 128])
def test_perplexity_within_three_percent(evaluation, g):
    base = evaluation["base"]["ppl"]
    assert evaluation[f"g{g}-clip"]["ppl"] <= 1.03 * base
    assert evaluation[f"g{g}-clip"]["top1"] >= 0.8
