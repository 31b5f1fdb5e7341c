"""What routing costs as the pool grows: the per-request work that scales with the number of engines.

Measured in-process, on this machine, for pools of 8, 80 and 800 engines (1x, 10x, 100x): one routing decision
(least-outstanding, and prefix affinity with its key already made), the affinity key of chat bodies of growing
size, and the Prometheus series a gateway exports per engine.

    .venv/bin/python -m scripts.measure_routing_cost --out docs/scaling/routing-cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from flushgate.metrics import Metrics
from flushgate.proxy.affinity import affinity_key
from flushgate.proxy.pool import EnginePool
from flushgate.proxy.router import Router, RoutingPolicy
from flushgate.proxy.upstream import Readiness, Unavailable
from flushgate.record import RequestRecord
from flushgate.timings import RequestTimings
from scripts.machine_info import machine

POOL_SIZES = (8, 80, 800)


class Engine:
    """The least a pool member needs: a URL, and never a reason to refuse."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def base_url(self) -> str:
        return self._url

    def unavailable(self) -> Unavailable | None:
        return None

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness:
        return Readiness(True)


def router_of(size: int, mode: str) -> Router:
    pool = EnginePool([Engine(f"http://10.{i // 250}.{i % 250}.1:8000") for i in range(size)])
    spread = random.Random(size)
    for member in pool.members:  # a pool in use: some load on every engine
        member.outstanding = spread.randrange(0, 32)
    return Router(pool, RoutingPolicy(mode=mode))  # type: ignore[arg-type]


def per_call_us(statement: Any, number: int) -> float:
    best = min(timeit.repeat(statement, number=number, repeat=5))
    return round(best / number * 1e6, 2)


def decision_cost(size: int) -> dict[str, float]:
    least, affine = router_of(size, "least-outstanding"), router_of(size, "prefix-affinity")
    key = 0x9E3779B97F4A7C15
    number = max(20, 20000 // size)
    return {
        "engines": size,
        "least_outstanding_us": per_call_us(lambda: least.pick(None), number),
        "prefix_affinity_us": per_call_us(lambda: affine.pick(key), number),
    }


def chat_body(turns: int) -> bytes:
    messages = [{"role": "system", "content": "You are a concise travel assistant. " * 20}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what else is there to see? " * 4})
        messages.append({"role": "assistant", "content": f"Answer {turn}: the old town and the river. " * 12})
    messages.append({"role": "user", "content": "And tomorrow?"})
    return orjson.dumps({"model": "m", "messages": messages, "stream": True})


def key_cost() -> list[dict[str, float]]:
    rows = []
    for turns in (0, 10, 100):
        body = chat_body(turns)
        rows.append({"body_bytes": len(body), "affinity_key_us": per_call_us(lambda b=body: affinity_key(b), 200)})
    return rows


def series_per_engine() -> dict[str, float]:
    """Prometheus series a gateway exports, and how many more each engine adds (one request served by each)."""

    def exported(size: int) -> int:
        router = router_of(size, "least-outstanding")
        metrics = Metrics(inflight=lambda: 0.0, router=router)
        for member in router.pool.members:
            router.pick(None)
            record = RequestRecord("r", "POST", "/v1/chat/completions", RequestTimings(start=1.0))
            record.served_by = member.url
            metrics.engine_requests.labels(member.url, "completed").inc()
            metrics.engine_ttft.labels(member.url).observe(0.05)
        text = metrics.render().decode()
        return sum(len(family.samples) for family in text_string_to_metric_families(text))

    small, large = exported(8), exported(80)
    return {"series_at_8_engines": small, "series_at_80_engines": large, "series_per_engine": (large - small) / 72}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {
        "machine": machine(),
        "decision": [decision_cost(size) for size in POOL_SIZES],
        "affinity_key": key_cost(),
        "metrics": series_per_engine(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
