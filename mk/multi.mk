# Several engines behind one flushgate (docs/scaling.md).
#   make bench-engines     the benchmark with 4 fake engines behind flushgate and nginx (docs/bench/engines-4);
#                          ENGINES=1 runs the same with one, for comparison (docs/bench/engines-1)
#   make affinity-measure  prefix affinity against least-outstanding on two real CPU vLLMs (docs/scaling)
#   make routing-cost      routing work per request at 8, 80 and 800 engines (docs/scaling)
ENGINES            ?= 4
ENGINES_BENCH_ARGS ?= --rounds 8

.PHONY: bench-engines affinity-measure routing-cost

bench-engines: bench-deps
	$(PY) -m flushgate.bench --engines $(ENGINES) --targets engine-direct flushgate nginx \
		--out docs/bench/engines-$(ENGINES) $(ENGINES_BENCH_ARGS)

routing-cost: install
	$(PY) -m scripts.measure_routing_cost --out docs/scaling/routing-cost.json

affinity-measure: install engine model
	$(PY) -m scripts.measure_affinity --conversations 24 --max-tokens 64 --think-s 3 \
		--out docs/scaling/affinity-cpu.json
