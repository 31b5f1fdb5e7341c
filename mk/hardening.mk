# Deeper fuzzing than `make test` runs: fresh random inputs each time, FUZZ_EXAMPLES per property (5000 take
# about 5 minutes per property on a 2-core machine).
FUZZ_EXAMPLES ?= 5000

.PHONY: fuzz

fuzz: install
	FLUSHGATE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_security_fuzz.py --timeout 1800 \
		--hypothesis-show-statistics
