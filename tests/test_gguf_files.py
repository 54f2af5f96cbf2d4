"""tools/gguf_files.py on a small random Q4_1 Llama GGUF (tests/gguf_util.build, written by the gguf
package's own writer and quantizer): the safetensors export holds exactly what gguf's dequantizer
decodes each tensor to (Q/K rows back in Hugging Face order), and tinyinfer and transformers load it;
the Q4_0 file's tensors decode within the Q4_0 formula's error of the Q4_1 values, the rest of the file
unchanged."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.gguf_util import build
from tools.gguf_files import export_safetensors, write_q4_0

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q4_1(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf"), "llama", "Q4_1")       # (path, {HF name: values})


def test_the_export_holds_the_files_dequantized_values_and_loads_in_both_engines(q4_1, tmp_path):
    from transformers import AutoModelForCausalLM
    from tinyinfer.engine.llm import LLM
    path, want = q4_1
    out = export_safetensors(path, str(tmp_path / "export"))
    got = load_file(f"{out}/model.safetensors")
    assert set(got) == set(want)
    for name, values in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], values), name           # bit for bit, permutation undone
    ids = [5, 9, 17, 3, 40, 41, 2, 8]
    ours = LLM(out, device="cpu", dtype="float32", max_kv_tokens=64)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = theirs(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours.logits(ids), ref, atol=1e-4, rtol=1e-4)
    ours.close()


def test_the_q4_0_file_decodes_within_the_q4_0_error_and_keeps_the_rest(q4_1, tmp_path):
    path, _ = q4_1
    out = write_q4_0(path, str(tmp_path / "m.Q4_0.gguf"))
    src, dst = gguf.GGUFReader(path), gguf.GGUFReader(out)
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    assert dst.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, field in src.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert dst.fields[name].contents() == field.contents(), name
    requantized = 0
    for a, b in zip(src.tensors, dst.tensors):
        if a.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            assert b.tensor_type == a.tensor_type and np.array_equal(a.data, b.data), a.name
            continue
        assert b.tensor_type == gguf.GGMLQuantizationType.Q4_0, a.name
        w = gguf.quants.dequantize(a.data, a.tensor_type).astype(np.float64).reshape(-1, 32)
        w0 = gguf.quants.dequantize(b.data, b.tensor_type).astype(np.float64).reshape(-1, 32)
        # Q4_0 (llama.cpp's formula): d = m / -8, m the block's value of largest magnitude, kept as
        # float16; levels d * (q - 8), q in 0..15. So |w - w'| <= |d| / 2 except where the opposite
        # extreme clips at q = 15 (<= |d|), d itself off by float16's rounding (2^-11 relative).
        m = np.take_along_axis(w, np.abs(w).argmax(1)[:, None], 1)
        d = np.abs(m / 8.0)
        err = np.abs(w - w0)
        clipped = w / -(m / 8.0) > 7.5                  # beyond level 15's half-step
        slack = d * 2.0 ** -11 * 8 + 1e-12
        assert (err[~clipped] <= (d / 2 + slack).repeat(32, 1)[~clipped]).all(), a.name
        assert (err <= d + slack).all(), a.name
        assert np.allclose(w0[np.arange(len(w)), np.abs(w).argmax(1)], m[:, 0], rtol=2.0 ** -10)
        requantized += 1
    assert requantized == 15                     # the head and 2 layers x (q, k, v, o, gate, up, down)
