# The benchmark (docs/bench/README.md): the engine direct, flushgate, nginx and LiteLLM's proxy in one bounded run
# on 127.0.0.1. `make bench` installs what it needs; `make test` needs none of it.
LITELLM_VENV    ?= .venv-litellm
LITELLM_VERSION ?= 1.108.7
BENCH_OUT       ?= docs/bench
BENCH_ARGS      ?=
SUDO            := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: bench bench-deps

# LiteLLM lives in its own venv: its many dependencies never meet flushgate's.
$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

# nginx from Debian; the service the package would start is switched off again, the benchmark runs its own.
bench-deps: $(VENV)/.bench-installed $(LITELLM_VENV)/.installed
	@if ! command -v nginx >/dev/null 2>&1 && ! [ -x /usr/sbin/nginx ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q nginx && \
		if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then \
			$(SUDO) systemctl disable --now nginx; fi; \
	fi

bench: bench-deps
	$(PY) -m flushgate.bench --out $(BENCH_OUT) --litellm $(LITELLM_VENV)/bin/litellm $(BENCH_ARGS)

# Where flushgate's CPU goes in one scenario (py-spy); writes collapsed stacks under artifacts/profile.
PROFILE_ARGS ?= --scenario 256x1ms
.PHONY: bench-profile
bench-profile: bench-deps
	$(PY) -m flushgate.bench.profile $(PROFILE_ARGS)

# What the per-hop record costs, in instructions per chunk under valgrind's callgrind (on and off, one workload).
.PHONY: bench-instructions
bench-instructions: bench-deps
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q valgrind; }
	$(PY) -m flushgate.bench.instructions --out $(BENCH_OUT)/hop-instructions.json

# What a whole one-token request on a new connection costs flushgate, in instructions (callgrind).
.PHONY: bench-request-instructions
bench-request-instructions: bench-deps
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q valgrind; }
	$(PY) -m flushgate.bench.instructions --per-request --out $(BENCH_OUT)/request-instructions.json

# CPU of one whole short request (one token, a new connection each) for flushgate, flushgate on aiohttp's server
# alone, and nginx.
.PHONY: bench-request-cost
bench-request-cost: bench-deps
	$(PY) -m flushgate.bench.request_cost --out $(BENCH_OUT)/request-cost.json

# The stress scenario's TTFT on a proxy's first burst (engine connections not yet open) and on the next one.
.PHONY: bench-first-burst
bench-first-burst: bench-deps
	$(PY) -m flushgate.bench.first_burst --out $(BENCH_OUT)/first-burst.json

# Chunk delay p50/p99 by the token's place in its stream (4 engines, 64 streams): where the slowest chunks are.
.PHONY: bench-chunk-position
bench-chunk-position: bench-deps
	$(PY) -m flushgate.bench.chunk_position --out $(BENCH_OUT)/chunk-position/latest.json
