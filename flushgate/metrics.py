"""Prometheus metrics, observed once per request from its record, never on the hot path."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CHUNK_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BulkHistogram(Collector):
    """A histogram fed a whole request's values at once (one per chunk), cheaper than one observe() each."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self.bounds, self.counts
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self.total += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.total)


class CallbackCounter(Collector):
    """A counter whose value lives elsewhere (the engine supervisor's restart count)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self.name, self.documentation, self.value = name, documentation, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


class Metrics:
    """One registry per gateway (no global state), exposed at ``/metrics``."""

    def __init__(self, inflight: Callable[[], float], engine_restarts: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "flushgate_time_to_first_token_seconds",
            "From request received to the first generated token written to the client.",
            ["api"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_ttfb = Histogram(
            "flushgate_upstream_ttfb_seconds",
            "From request received to the engine's response headers.",
            ["api"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "flushgate_request_duration_seconds",
            "From request received to the last byte written.",
            ["api", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter("flushgate_requests", "Requests by API and outcome.", ["api", "outcome"], registry=r)
        self.gap = BulkHistogram(
            "flushgate_inter_token_gap_seconds", "Time between consecutive chunks from the engine.", GAP_BUCKETS
        )
        self.chunk = BulkHistogram(
            "flushgate_gateway_chunk_seconds",
            "Per chunk, from its arrival from the engine to its write to the client returning.",
            CHUNK_BUCKETS,
        )
        r.register(self.gap)
        r.register(self.chunk)
        Gauge("flushgate_inflight_requests", "Requests being served now.", registry=r).set_function(inflight)
        if engine_restarts is not None:
            r.register(
                CallbackCounter(
                    "flushgate_engine_restarts",
                    "Times the managed engine was restarted after exiting.",
                    engine_restarts,
                )
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
