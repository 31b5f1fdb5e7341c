"""One streamed chat request, with the arrival time and size of every network read.

Bytes are read as they came off the wire (no decompression by the HTTP client), so a hop that compresses is seen
doing so, and every read is stamped the moment the event loop hands it over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

import aiohttp

from flushgate.doctor.events import EventDecoder, StreamFormat, stream_format

Ending = Literal["complete", "error_event", "cut", "http_error", "failed", "probe_timeout"]

_EXCERPT_CHARS = 300


@dataclass(slots=True)
class Read:
    at_ms: float  # since the request was sent
    size: int  # bytes on the wire
    events: int
    tokens: int
    partial: bool  # ended inside an event


@dataclass(slots=True)
class Capture:
    url: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    headers_ms: float | None = None
    reads: list[Read] = field(default_factory=list)
    end_ms: float | None = None  # when the body ended, however it ended
    error_event_ms: float | None = None
    ending: Ending = "complete"
    error: str | None = None
    decodable: bool = True

    @property
    def token_times(self) -> list[float]:
        return [read.at_ms for read in self.reads for _ in range(read.tokens)]

    @property
    def tokens(self) -> int:
        return sum(read.tokens for read in self.reads)

    @property
    def events(self) -> int:
        return sum(read.events for read in self.reads)

    @property
    def wire_bytes(self) -> int:
        return sum(read.size for read in self.reads)

    @property
    def answered(self) -> bool:
        return self.ending not in ("http_error", "failed")


def _ms_since(start: float) -> float:
    return round((perf_counter() - start) * 1000, 3)


async def capture_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    expected: StreamFormat,
    timeout_s: float,
) -> Capture:
    """Send ``body`` to ``url`` and time the streamed answer; never raises for what the path does wrong."""
    capture = Capture(url=url)
    start = perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _exchange(session, url, body, expected, capture, start)
    except TimeoutError:
        capture.ending = "probe_timeout"
        capture.error = f"the probe gave up after {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        if capture.headers_ms is None:
            capture.ending = "failed"
            capture.error = f"no answer: {exc!r}"
        else:
            capture.ending = "cut"
            capture.error = f"the connection broke: {exc!r}"
    capture.end_ms = _ms_since(start)
    return capture


async def _exchange(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    expected: StreamFormat,
    capture: Capture,
    start: float,
) -> None:
    # Like a browser, so a hop that compresses for browsers does so here too; only codings the decoder knows.
    async with session.post(url, json=body, headers={"Accept-Encoding": "gzip, deflate"}) as resp:
        capture.headers_ms = _ms_since(start)
        capture.status = resp.status
        capture.headers = {key.lower(): value for key, value in resp.headers.items()}
        if resp.status != 200:
            capture.ending = "http_error"
            text = (await resp.read()).decode("utf-8", "replace")
            capture.error = f"HTTP {resp.status}: {text[:_EXCERPT_CHARS]}"
            return
        fmt = stream_format(resp.headers.get("Content-Type")) or expected
        decoder = EventDecoder(fmt, resp.headers.get("Content-Encoding"))
        capture.decodable = decoder.decodable
        done = False
        async for chunk in resp.content.iter_any():
            at = _ms_since(start)
            got = decoder.feed(chunk)
            capture.reads.append(Read(at, len(chunk), got.events, got.tokens, got.partial))
            done = done or got.done
            if got.error is not None and capture.error_event_ms is None:
                capture.ending = "error_event"
                capture.error_event_ms = at
                capture.error = got.error
        if capture.ending == "complete" and not done and decoder.decodable:
            capture.ending = "cut"
            capture.error = "the body ended without the stream's end marker"
