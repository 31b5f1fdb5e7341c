"""Per-request timestamps, stamped on the hot path and turned into numbers only once, at the end."""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from operator import sub
from time import perf_counter

now = perf_counter
FAST_CHUNK_S = 0.00001  # a chunk handled within this is only counted (the first bucket of the chunk histogram)


def to_ms(seconds: float) -> float:
    """Milliseconds to the microsecond: ``round(x, 3)`` goes through a decimal conversion, 3-4x slower."""
    return round(seconds * 1e6) / 1000


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats drifting
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


@dataclass(slots=True)
class RequestTimings:
    """Monotonic timestamps (seconds, ``perf_counter``) and counters for one request.

    The hot path only assigns to these fields and appends to arrays of doubles (no object per chunk is kept): one
    arrival time per chunk, and its handling time only when that is not negligible (most chunks are written in a
    few microseconds and are just counted). Arithmetic happens in :meth:`summary`, once per request, in C-level
    loops where it can.
    """

    start: float
    body_done: float = 0.0  # last byte of the request body read from the client
    upstream_call: float = 0.0  # the gateway hands the request to its upstream connection pool
    connect_start: float = 0.0
    connect_end: float = 0.0
    connection_reused: bool | None = None
    upstream_headers: float = 0.0
    first_token: float = 0.0  # first chunk carrying generated text (or reasoning, or a tool call)
    end: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    events: int = 0
    write_blocked: float = 0.0  # time spent inside writes to the client (backpressure from a slow reader)
    chunk_work: float = 0.0  # per chunk, the gateway's own work outside the writes (translating an Ollama line)
    arrivals: array[float] = field(default_factory=lambda: array("d"))  # upstream chunk arrival times
    fast_chunks: int = 0  # chunks handled (arrival to write done) within FAST_CHUNK_S: only counted
    slow_chunks: array[float] = field(default_factory=lambda: array("d"))  # the others' handling times
    _gaps: list[float] | None = None

    @property
    def chunks(self) -> int:
        return len(self.arrivals)

    @property
    def first_chunk(self) -> float:
        return self.arrivals[0] if self.arrivals else 0.0

    @property
    def last_chunk(self) -> float:
        return self.arrivals[-1] if self.arrivals else 0.0

    def gaps(self) -> list[float]:
        """Seconds between consecutive upstream chunks, from the first token on (the role-only opening chunk and
        the engine's time to first token are not inter-token gaps), sorted; worked out once."""
        if self._gaps is None:
            stamps = self.arrivals
            begin = bisect_left(stamps, self.first_token) if self.first_token else 0  # arrivals only grow
            self._gaps = sorted(map(sub, stamps[begin + 1 :], stamps[begin:-1]))
        return self._gaps

    def chunks_after(self, t: float) -> int:
        return len(self.arrivals) - bisect_right(self.arrivals, t)

    def summary(self) -> dict[str, float | int | bool | None]:
        start, arrivals = self.start, self.arrivals
        gaps = self.gaps()
        return {
            "body_read_ms": to_ms(self.body_done - start) if self.body_done else None,
            "upstream_connect_ms": to_ms(self.connect_end - self.connect_start) if self.connect_end else None,
            "upstream_reused": self.connection_reused,
            "upstream_ttfb_ms": to_ms(self.upstream_headers - start) if self.upstream_headers else None,
            "first_event_ms": to_ms(arrivals[0] - start) if arrivals else None,
            "first_token_ms": to_ms(self.first_token - start) if self.first_token else None,
            "last_token_ms": to_ms(arrivals[-1] - start) if arrivals else None,
            "total_ms": to_ms(self.end - start) if self.end else None,
            "gap_p50_ms": to_ms(percentile(gaps, 50)) if gaps else None,
            "gap_p99_ms": to_ms(percentile(gaps, 99)) if gaps else None,
            "gap_max_ms": to_ms(gaps[-1]) if gaps else None,
            "gaps_over_100ms": len(gaps) - bisect_right(gaps, 0.1),  # gaps are sorted
            "write_blocked_ms": to_ms(self.write_blocked),
            "chunks": self.chunks,
            "events_out": self.events,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
