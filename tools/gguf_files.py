"""gguf_files: the other forms of a GGUF checkpoint that `bench quality` and `bench llamacpp` compare, made
from the file itself, without llama.cpp:

  * a safetensors export (Hugging Face layout: config.json, model.safetensors, tokenizer files) holding
    the file's weights dequantized to float32 -- transformers' GGUF reader (`from_pretrained(dir,
    gguf_file=...)`, which undoes llama.cpp's Q/K row permutation), its tensors written with
    safetensors (`save_pretrained` refuses a model read from a GGUF), config and tokenizer by theirs; both
    transformers and tinyinfer load the directory as any Hugging Face checkpoint;
  * a Q4_0 GGUF: the same metadata and tensors, each Q4_1 tensor re-quantized to Q4_0 from its
    dequantized values by the `gguf` package's numpy quantizer (`gguf.quants.quantize`; llama.cpp's
    Q4_0 formula: per block of 32 weights, d = m / -8 with m the value of largest magnitude, stored as
    float16, q = min(15, floor(w / d + 8.5)), w' = d (q - 8)). The values are the export's, so the
    Q4_0 file's loss against the export's float32 is Q4_0's own (on top of the Q4_1 the file shipped as).

    python -m tools.gguf_files --gguf .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --export .cache/models/SmolLM2-135M-Instruct-f32 --q4-0 .cache/models/SmolLM2-135M-Instruct.Q4_0.gguf

Files go under .cache/ (git ignores it); `ensure_smollm2_files()` makes SmolLM2's once for tests and
benches. GGUF format: the GGUF specification in the ggml project (github.com/ggml-org/ggml).
"""
from __future__ import annotations

import argparse
import os
import sys

import gguf
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "models")
SMOLLM2_Q4_1 = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_EXPORT = os.path.join(CACHE, "SmolLM2-135M-Instruct-f32")
SMOLLM2_Q4_0 = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_0.gguf")
# Fields GGUFWriter writes itself (header counts, the architecture it is constructed with).
_OWN_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture",
               "general.alignment")


def export_safetensors(gguf_path: str, out_dir: str) -> str:
    """A Hugging Face checkpoint directory of the GGUF's weights dequantized to float32 -> out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer     # a test / bench dependency
    if not os.path.isfile(gguf_path):
        raise SystemExit(f"--gguf {gguf_path}: no such file (tests/gguf_util.py fetches SmolLM2's)")
    where, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tmp = out_dir.rstrip("/") + ".partial"
    os.makedirs(tmp, exist_ok=True)
    # save_pretrained refuses a model read from a GGUF: write its tensors and config directly.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)                   # the embedding's, as HF checkpoints store it
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config                 # the values are dense float32 now
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else _replace_dir(tmp, out_dir)
    return out_dir


def _replace_dir(tmp: str, out_dir: str) -> None:
    import shutil
    shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_q4_0(gguf_path: str, out_path: str) -> str:
    """The GGUF at gguf_path with every Q4_1 tensor re-quantized to Q4_0 (metadata and the other
    tensors copied as they are; general.file_type says MOSTLY_Q4_0) -> out_path."""
    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    tmp = out_path + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name in _OWN_FIELDS:
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q4_0)
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    if "general.file_type" not in reader.fields:
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))               # numpy order: (rows, cols)
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            data = gguf.quants.quantize(dense.astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape,
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path


def ensure_smollm2_files(export: bool = True, q4_0: bool = True) -> dict[str, str]:
    """SmolLM2's export and Q4_0 file under .cache/models, made once from the Q4_1 GGUF (fetched by
    tests/gguf_util.py) -> {"q4_1": path, "export": dir, "q4_0": path}."""
    if not os.path.isfile(SMOLLM2_Q4_1):
        raise SystemExit(f"{SMOLLM2_Q4_1}: no such file (tests/gguf_util.py smollm2_gguf() fetches it)")
    if export and not os.path.isfile(os.path.join(SMOLLM2_EXPORT, "model.safetensors")):
        export_safetensors(SMOLLM2_Q4_1, SMOLLM2_EXPORT)
    if q4_0 and not os.path.isfile(SMOLLM2_Q4_0):
        write_q4_0(SMOLLM2_Q4_1, SMOLLM2_Q4_0)
    return {"q4_1": SMOLLM2_Q4_1, "export": SMOLLM2_EXPORT, "q4_0": SMOLLM2_Q4_0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gguf_files", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=SMOLLM2_Q4_1, help="the GGUF file to start from")
    parser.add_argument("--export", metavar="DIR", help="write the float32 safetensors export there")
    parser.add_argument("--q4-0", metavar="FILE", help="write the Q4_0 re-quantized GGUF there")
    args = parser.parse_args(argv)
    if not (args.export or args.q4_0):
        parser.error("give --export DIR and/or --q4-0 FILE")
    if not os.path.isfile(args.gguf):
        parser.error(f"--gguf {args.gguf}: no such file")
    if args.export:
        print(f"export: {export_safetensors(args.gguf, args.export)}")
    if args.q4_0:
        print(f"q4_0: {write_q4_0(args.gguf, args.q4_0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
