# tinyinfer: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
PROMPT ?= ROMEO:
CKPT ?= models/shakespeare-llama

.PHONY: install run test test-deps bench

install:
	@$(PYTHON) -c "import tinyinfer, torch, safetensors, sentencepiece" 2>/dev/null || $(PYTHON) -m pip install -e .

run: install
	$(PYTHON) -m tinyinfer.generate --ckpt $(CKPT) --prompt "$(PROMPT)" --max-new-tokens 64

test-deps: install
	@$(PYTHON) -c "import pytest, transformers, tokenizers, google.protobuf" 2>/dev/null || $(PYTHON) -m pip install -e ".[test]"

test: test-deps
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m tinyinfer.bench e2e --ckpt $(CKPT) --device cpu
