"""Prometheus metrics, observed once per request from its record, never on the hot path."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from math import fsum
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from flushgate.timings import FAST_CHUNK_S

if TYPE_CHECKING:
    from flushgate.proxy.router import Router
    from flushgate.worker_metrics import WorkerMetrics

S = TypeVar("S")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The first bound is the one below which the hot path only counts a chunk (see RequestTimings.fast_chunks).
CHUNK_BUCKETS = (FAST_CHUNK_S, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BulkHistogram(Collector):
    """A histogram fed a whole request's values at once (one per chunk), cheaper than one observe() each."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe_many(
        self, values: Iterable[float], *, fast: int = 0, total: float | None = None, ordered: bool = False
    ) -> None:
        """Bucket counts by bisecting the sorted values at each bound: a few C calls per bucket, not per value.

        ``fast``: further values, not listed, known to fall in the first bucket; ``total``: the sum of all of them
        when ``fast`` leaves the listed ones short of it; ``ordered``: ``values`` is a list already sorted."""
        ordered_values = values if ordered and isinstance(values, list) else sorted(values)
        counts = self.counts
        counts[0] += fast
        if not ordered_values:  # a one-token answer has no gaps: no bucket to bisect for
            self.total += total or 0.0
            return
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(ordered_values, bound)  # values <= bound, as Prometheus's le means
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered_values) - below
        self.total += fsum(ordered_values) if total is None else total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        buckets = _cumulative(self.bounds, self.counts)
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.total)


def _cumulative(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    """Counts per bucket as Prometheus's cumulative ``le`` buckets, bounds written as prometheus_client writes
    them ("1.0"), the last one +Inf."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*map(floatToGoString, bounds), "+Inf"], counts, strict=True):
        running += count
        out.append((bound, running))
    return out


class _Buckets:
    """One label set's histogram: plain attributes, written from the event loop alone (what a scrape reads too)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: Prometheus's le
        self.total += amount


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _ByLabels(Collector, Generic[S]):
    """One series per label set, made when first asked for, as prometheus_client's ``labels()`` does."""

    def __init__(self, name: str, documentation: str, labels: list[str], make: Callable[[], S]) -> None:
        self.name, self.documentation, self.label_names = name, documentation, labels
        self.series: dict[tuple[str, ...], S] = {}
        self._make = make

    def labels(self, *values: str) -> S:
        series = self.series.get(values)
        if series is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes the labels {self.label_names}, got {values}")
            series = self.series[values] = self._make()
        return series


class LabelledHistogram(_ByLabels[_Buckets]):
    """A histogram by labels, observed once per request from its record. prometheus_client's ``Histogram`` takes
    a lock and walks its bounds in Python for each value and each of its sum and bucket counters: several
    times this one bisection (the record observes up to four per request)."""

    def __init__(self, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]) -> None:
        self.bounds = list(buckets)
        super().__init__(name, documentation, labels, lambda: _Buckets(self.bounds))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, series in self.series.items():
            family.add_metric(list(values), _cumulative(self.bounds, series.counts), series.total)
        yield family


class LabelledCounter(_ByLabels[_Count]):
    """A counter by labels, for the same reason as ``LabelledHistogram``."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, labels, _Count)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, series in self.series.items():
            family.add_metric(list(values), series.value)
        yield family


class CallbackCounter(Collector):
    """A counter whose value lives elsewhere (the engine supervisor's restart count)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self.name, self.documentation, self.value = name, documentation, value

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


class EnginePoolCollector(Collector):
    """Per-engine state read from the router at scrape time, so engines that left the pool leave the gauges."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        outstanding = GaugeMetricFamily(
            "flushgate_engine_outstanding_requests", "Requests open on the engine now.", labels=["engine"]
        )
        in_rotation = GaugeMetricFamily(
            "flushgate_engine_in_rotation",
            "1 while the engine takes new requests; 0 while it is ejected, failing its checks, loading or stopping.",
            labels=["engine"],
        )
        ejections = CounterMetricFamily(
            "flushgate_engine_ejections", "Times the engine was taken out of rotation by failures.", labels=["engine"]
        )
        picks = CounterMetricFamily(
            "flushgate_engine_routing_decisions",
            "Attempts routed to the engine, by why it was chosen (affinity, affinity_overflow, least_outstanding, "
            "panic: every engine was out of rotation).",
            labels=["engine", "reason"],
        )
        now = self.router.pool.clock()
        for member in self.router.pool.members:
            outstanding.add_metric([member.url], member.outstanding)
            in_rotation.add_metric([member.url], 1.0 if member.available(now) else 0.0)
            ejections.add_metric([member.url], member.ejections)
            for reason, count in member.picks.items():
                picks.add_metric([member.url, reason], count)
        yield from (outstanding, in_rotation, ejections, picks)


class Metrics:
    """One registry per gateway (no global state), exposed at ``/metrics``."""

    def __init__(
        self,
        inflight: Callable[[], float],
        engine_restarts: Callable[[], float] | None = None,
        router: Router | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.group: WorkerMetrics | None = None  # set in a worker of a --workers group
        r = self.registry
        self.ttft = LabelledHistogram(
            "flushgate_time_to_first_token_seconds",
            "From request received to the first generated token written to the client.",
            ["api"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.upstream_ttfb = LabelledHistogram(
            "flushgate_upstream_ttfb_seconds",
            "From request received to the engine's response headers.",
            ["api"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.duration = LabelledHistogram(
            "flushgate_request_duration_seconds",
            "From request received to the last byte written.",
            ["api", "outcome"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.requests = LabelledCounter("flushgate_requests", "Requests by API and outcome.", ["api", "outcome"])
        self.gap = BulkHistogram(
            "flushgate_inter_token_gap_seconds", "Time between consecutive chunks from the engine.", GAP_BUCKETS
        )
        self.chunk = BulkHistogram(
            "flushgate_gateway_chunk_seconds",
            "Per chunk, from its arrival from the engine to its write to the client returning.",
            CHUNK_BUCKETS,
        )
        self.engine_requests = LabelledCounter(
            "flushgate_engine_requests", "Requests by the engine that served them and outcome.", ["engine", "outcome"]
        )
        self.engine_ttft = LabelledHistogram(
            "flushgate_engine_time_to_first_token_seconds",
            "From request received to the first generated token written to the client, by engine.",
            ["engine"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.engine_failovers = LabelledCounter(
            "flushgate_engine_failovers",
            "Attempts that failed on the engine before anything reached the client, and went to another engine.",
            ["engine"],
        )
        self.engine_stale_resends = LabelledCounter(
            "flushgate_engine_stale_resends",
            "Requests sent again on a new connection because the engine closed a kept-alive one under them; if "
            "this grows, the engine's idle time is not above --engine-keepalive.",
            ["engine"],
        )
        for collector in (
            self.ttft, self.upstream_ttfb, self.duration, self.requests, self.gap, self.chunk,
            self.engine_requests, self.engine_ttft, self.engine_failovers, self.engine_stale_resends,
        ):  # fmt: skip
            r.register(collector)
        if router is not None:
            r.register(EnginePoolCollector(router))
        Gauge("flushgate_inflight_requests", "Requests being served now.", registry=r).set_function(inflight)
        if engine_restarts is not None:
            r.register(
                CallbackCounter(
                    "flushgate_engine_restarts",
                    "Times the managed engine was restarted after exiting.",
                    engine_restarts,
                )
            )

    def watch_own_server(self, answered: Callable[[], float], handed_over: Callable[[], float]) -> None:
        """How much of the traffic the gateway's own HTTP server takes (proxy/front.py)."""
        self.registry.register(
            CallbackCounter(
                "flushgate_own_server_requests",
                "Requests answered by the gateway's own HTTP server rather than aiohttp's.",
                answered,
            )
        )
        self.registry.register(
            CallbackCounter(
                "flushgate_handed_over_connections",
                "Client connections the gateway's own HTTP server handed to aiohttp's (a request it does not take).",
                handed_over,
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """What ``/metrics`` answers: this process's series, or with ``--workers`` every worker's."""
        return self.render() if self.group is None else await self.group.render_all()
