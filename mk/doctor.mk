# `make seed-table` (docs/doctor.md): the engine direct, flushgate, and a buffering nginx in front of each, on this
# machine's CPU vLLM, judged by `flushgate doctor probe`. Installs what it needs; `make test` needs none of it.
SEED_OUT   ?= docs
SEED_ARGS  ?=
DOCTOR_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: seed-table seed-table-deps

# matplotlib for the chart (the `chart` extra).
$(VENV)/.doctor-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[chart]'
	touch $@

# nginx from Debian; the service the package would start is switched off again, the seed table runs its own.
seed-table-deps: $(VENV)/.doctor-installed engine model
	@if ! command -v nginx >/dev/null 2>&1 && ! [ -x /usr/sbin/nginx ]; then \
		$(DOCTOR_SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(DOCTOR_SUDO) apt-get install -y -q nginx && \
		if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then \
			$(DOCTOR_SUDO) systemctl disable --now nginx; fi; \
	fi

seed-table: seed-table-deps
	$(PY) -m flushgate.doctor.seed --model $(MODEL_DIR) --out $(SEED_OUT) $(SEED_ARGS)
