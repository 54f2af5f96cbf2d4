"""GGUF metadata on small synthetic files: clear errors for bad or unsupported files, rope scaling
(incl. Llama 3's, recovered from rope_freqs.weight and checked against transformers' llama3 formula)
and the generation config."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gguf_util import VOCAB, base_meta, write_gguf
from tinyinfer.loading.gguf import GGUFError, load_gguf


def _llama_file(tmp_path, name="m.gguf", drop=(), meta_extra=None, tensors_extra=None, arch="llama"):
    meta = {k: v for k, v in base_meta("llama", layers=1).items() if k not in drop}
    meta = {k.replace("llama.", f"{arch}.", 1): v for k, v in meta.items()}
    meta.update(meta_extra or {})
    tensors = {"token_embd.weight": (np.zeros((VOCAB, 64), np.float32), "F32"), **(tensors_extra or {})}
    return write_gguf(str(tmp_path / name), arch, meta, tensors)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        load_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "text.gguf").write_text("not a gguf file at all")
    with pytest.raises(GGUFError, match="cannot read .*text.gguf as GGUF"):
        load_gguf(str(tmp_path / "text.gguf"))
    with pytest.raises(GGUFError, match="architecture 'gemma2' is not supported"):
        load_gguf(_llama_file(tmp_path, "g.gguf", arch="gemma2"))
    with pytest.raises(GGUFError, match="lacks the required key 'llama.block_count'"):
        load_gguf(_llama_file(tmp_path, "k.gguf", drop=("llama.block_count",)))
    iq4 = np.random.default_rng(0).integers(0, 256, (64, 2 * 18), dtype=np.uint8)
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight is stored as IQ4_NL"):
        load_gguf(_llama_file(tmp_path, "t.gguf", tensors_extra={"blk.0.ffn_up.weight": (iq4, "IQ4_NL")}))
    norm = (np.ones(16, np.float32), "F32")
    with pytest.raises(GGUFError, match="blk.0.attn_q_norm.weight has no Hugging Face counterpart"):
        load_gguf(_llama_file(tmp_path, "n.gguf", tensors_extra={"blk.0.attn_q_norm.weight": norm}))
    with pytest.raises(GGUFError, match="rope.scaling.type is 'longrope'"):
        load_gguf(_llama_file(tmp_path, "r.gguf", meta_extra={"llama.rope.scaling.type": "longrope",
                                                             "llama.rope.scaling.factor": 2.0}))
    with pytest.raises(GGUFError, match="llama.rope.scaling.yarn_ext_factor = 0.5 is a rope scaling"):
        load_gguf(_llama_file(tmp_path, "y.gguf", meta_extra={"llama.rope.scaling.type": "yarn",
                                                             "llama.rope.scaling.factor": 2.0,
                                                             "llama.rope.scaling.yarn_ext_factor": 0.5}))
    with pytest.raises(GGUFError, match="rope_freqs.weight"):
        load_gguf(_llama_file(tmp_path, "f.gguf",
                              tensors_extra={"rope_freqs.weight": (np.ones(8, np.float32), "F32")}))
    with pytest.raises(GGUFError, match="partial rotary"):
        load_gguf(_llama_file(tmp_path, "p.gguf", meta_extra={"llama.rope.dimension_count": 8}))


def test_truncated_file(tmp_path):
    up = (np.ones((128, 64), np.float32), "F32")
    path = _llama_file(tmp_path, tensors_extra={"blk.0.ffn_up.weight": up})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(path)
    with open(path, "r+b") as f:                 # cut inside the header
        f.truncate(200)
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf(path)


def test_rope_scaling_and_generation_config(tmp_path):
    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 64, "tokenizer.ggml.eot_token_id": 5,
            "tokenizer.chat_template": "{{ messages }}", "tokenizer.ggml.padding_token_id": 0}
    ckpt = load_gguf(_llama_file(tmp_path, meta_extra=meta))
    assert ckpt.config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 64}
    assert ckpt.config["tie_word_embeddings"] and "lm_head.weight" not in ckpt.tensors
    assert ckpt.generation_config == {"bos_token_id": VOCAB - 2, "eos_token_id": [VOCAB - 1, 5],
                                      "pad_token_id": 0}
    assert ckpt.chat_template == "{{ messages }}"
    linear = load_gguf(_llama_file(tmp_path, "l.gguf", meta_extra={"llama.rope.scaling.type": "linear",
                                                                  "llama.rope.scaling.factor": 2.0}))
    assert linear.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def _hf_llama3_factors(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores in rope_freqs.weight for a Llama 3.x config: the default
    inverse frequencies over transformers' llama3 ones, in float32."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_theta": theta, **rope})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (default / scaled.double()).float().numpy()


@pytest.mark.parametrize("factor,high,ctx", [(8.0, 4.0, 8192), (32.0, 4.0, 8192), (16.0, 2.0, 4096)])
def test_llama3_rope_from_rope_freqs(tmp_path, factor, high, ctx):
    """Llama 3.x files: the rope_scaling transformers' llama3 formula needs, recovered from
    rope_freqs.weight (which transformers' GGUF loader ignores)."""
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
            "original_max_position_embeddings": ctx}
    meta = base_meta("llama", layers=1, hidden=256, heads=2, kv_heads=2)
    meta["llama.rope.freq_base"] = 500000.0
    freqs = _hf_llama3_factors(rope, 500000.0, 128)
    tensors = {"token_embd.weight": (np.zeros((VOCAB, 256), np.float32), "F32"),
               "rope_freqs.weight": (freqs, "F32")}
    ckpt = load_gguf(write_gguf(str(tmp_path / "l3.gguf"), "llama", meta, tensors))
    assert ckpt.config["rope_scaling"] == rope
    assert "rope_freqs.weight" not in {t.gguf_name for t in ckpt.tensors.values()}
    tensors["rope_freqs.weight"] = (freqs * np.linspace(1, 1.1, 64, dtype=np.float32), "F32")
    with pytest.raises(GGUFError, match="not Llama 3 rope scaling"):
        load_gguf(write_gguf(str(tmp_path / "other.gguf"), "llama", meta, tensors))


def _reference_value(field):
    """A metadata value as gguf.GGUFReader (llama.cpp's reader) parses it, in plain Python."""
    import gguf
    main = field.types[0]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if main != gguf.GGUFValueType.ARRAY:
        return field.parts[field.data[0]][0].item()
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


def _same_as_gguf_reader(path):
    """The scan's metadata (gguf_scan.py, read through gguf_file.Metadata) and the tensor table of the
    reader that skipped the key/value section equal a plain gguf.GGUFReader's parse of the whole file."""
    import gguf
    from tinyinfer.loading.gguf_file import Metadata, open_reader
    reader, header = open_reader(path)
    ours, ref = Metadata(header, path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert ours.keys() == keys
    for k in keys:
        want = _reference_value(ref.fields[k])
        got = ours.get(k)
        if ref.fields[k].types == [gguf.GGUFValueType.FLOAT32]:    # ours: the shortest decimal
            assert np.float32(got) == np.float32(want) and got == float(str(np.float32(want))), k
        else:
            assert got == want and type(got) is type(want), k
    assert [t.name for t in reader.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(reader.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist()
        assert a.n_bytes == b.n_bytes and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)
    return ours


def test_header_parse_equals_gguf_reader(tmp_path):
    """The validating scan (gguf_scan.py) plus the tensor-table-only reader (gguf_file.py) read what
    llama.cpp's gguf.GGUFReader reads: every value type, string / int / float / bool arrays, every
    tensor's type, shape and bytes; float32 scalars as their shortest decimal."""
    meta = {"x.flag": True, "x.count": 7, "x.eps": 1e-5, "x.name": "naïve ✓",
            "x.ints": [1, 2, 3], "x.floats": [0.5, -1.25], "x.strs": ["a", "", "☃"],
            "x.bools": [True, False]}
    rng = np.random.default_rng(0)
    q4 = rng.integers(0, 256, (128, 2 * 20), dtype=np.uint8)
    path = _llama_file(tmp_path, meta_extra=meta, tensors_extra={
        "blk.0.ffn_up.weight": (q4, "Q4_1"),
        "blk.0.ffn_norm.weight": (np.ones(64, np.float16), "F16")})
    ours = _same_as_gguf_reader(path)
    assert ours.get("x.eps") == 1e-05 and ours.get("x.floats") == [0.5, -1.25]


def test_header_parse_equals_gguf_reader_smollm2():
    from gguf_util import smollm2_gguf
    _same_as_gguf_reader(smollm2_gguf())
