"""Packaging. `pip install -e .` installs the Python package only and never compiles CUDA, so it is fast
and works where CUDA is absent; `make build` compiles the kernels ahead of time (see tinyinfer/kernels.py)."""
from setuptools import find_packages, setup

setup(
    name="tinyinfer",
    version="0.1.0",
    description="A small, from-scratch LLM inference engine: paged KV cache, INT4, MLA, speculative decoding",
    packages=find_packages(include=["tinyinfer", "tinyinfer.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "safetensors", "sentencepiece", "numpy", "ninja", "tqdm"],
    extras_require={"test": ["pytest", "transformers>=5.0", "tokenizers", "protobuf"], "tokenizers": ["tokenizers"]},
)
