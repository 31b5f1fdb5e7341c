"""Per-request timestamps, stamped on the hot path and turned into numbers only once, at the end."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

now = perf_counter


@dataclass(slots=True)
class RequestTimings:
    """Monotonic timestamps (seconds, ``perf_counter``) and counters for one request.

    The hot path only assigns to these fields; arithmetic happens in :meth:`summary`.
    """

    start: float
    upstream_headers: float = 0.0
    first_chunk: float = 0.0
    last_chunk: float = 0.0
    end: float = 0.0
    chunks: int = 0
    bytes_out: int = 0

    def summary(self) -> dict[str, float | int | None]:
        def since_start(t: float) -> float | None:
            return round((t - self.start) * 1000, 3) if t else None

        return {
            "upstream_ttfb_ms": since_start(self.upstream_headers),
            "first_chunk_ms": since_start(self.first_chunk),
            "last_chunk_ms": since_start(self.last_chunk),
            "duration_ms": since_start(self.end),
            "chunks": self.chunks,
            "bytes_out": self.bytes_out,
        }
