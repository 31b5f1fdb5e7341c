# Open WebUI (PyPI open-webui) pointed at flushgate as its Ollama server: lists the model and its thinking aliases
# and streams a chat in both modes, against a real CPU vLLM. Not part of `make test`: its venv is ~2.9 GB.
OPEN_WEBUI_VENV  ?= .cache/open-webui-venv
OPEN_WEBUI_SPEC  ?= open-webui==0.12.4
# Installed first so pip keeps this CPU build instead of fetching another torch for open-webui.
OPEN_WEBUI_TORCH ?= torch==2.13.0

.PHONY: open-webui open-webui-check

$(OPEN_WEBUI_VENV)/.installed:
	$(PYTHON) -m venv $(OPEN_WEBUI_VENV)
	$(OPEN_WEBUI_VENV)/bin/pip install -q $(OPEN_WEBUI_TORCH)
	$(OPEN_WEBUI_VENV)/bin/pip install -q $(OPEN_WEBUI_SPEC)
	touch $@

open-webui: $(OPEN_WEBUI_VENV)/.installed

open-webui-check: install engine model open-webui
	FLUSHGATE_OPEN_WEBUI=$(abspath $(OPEN_WEBUI_VENV))/bin/open-webui \
		$(PY) -m pytest tests/real/test_ollama_real.py -k open_webui -v $(PYTEST_ARGS)
