# The chat page's browser tests: Debian's Chromium (and its driver), driven by Playwright's Python package.
# Playwright's own browser download is never used; the tests start /usr/bin/chromium.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: browser-deps test-page

browser-deps: install
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; \
	fi
	@$(PY) -c 'import playwright' 2>/dev/null || $(PY) -m pip install -q 'playwright>=1.50'

# Only the chat page's tests (the real-engine ones start CPU vLLM once).
test-page: browser-deps engine model
	$(PY) -m pytest tests/test_chat_page.py tests/real/test_chat_page_real.py $(PYTEST_ARGS)
