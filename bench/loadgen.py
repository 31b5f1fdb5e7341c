"""Load generator: streams opened on raw sockets, each piece of bytes stamped with its receive time.

While a scenario runs, a connection does the least it can per read: take the clock, keep the bytes, and watch
for the end of the response. Only afterwards are the pieces parsed (``framing``) and each event matched with
the send time the engine wrote into it, so parsing never delays the clock of the next read.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import orjson

from flushgate.bench.engine import CHAT_PATH, cadence_model
from flushgate.bench.framing import BodyMode, EventSplitter, FramingError, MessageParser, event_data

_TAIL = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Scenario:
    """``streams`` concurrent clients, each sending ``requests`` streamed requests one after the other."""

    name: str
    streams: int
    requests: int
    tokens: int
    interval_us: int
    deadline_s: float

    @property
    def model(self) -> str:
        return cadence_model(self.interval_us)

    @property
    def expected_chunks(self) -> int:
        return self.streams * self.requests * self.tokens

    def request_bytes(self, host: str, port: int, bearer: str) -> bytes:
        body = orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "bench"}],
                "stream": True,
                "max_tokens": self.tokens,
            }
        )
        head = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nAuthorization: Bearer {bearer}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


@dataclass(slots=True)
class Recording:
    """What one request saw: when it began, and every piece of bytes with the time it arrived."""

    started_ns: int
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    eof: bool = False
    error: str | None = None
    timed_out: bool = False


class _Recorder(asyncio.Protocol):
    """Hot path: stamp and keep. The end is spotted cheaply here; the parse afterwards has the last word."""

    def __init__(self, recording: Recording, done: asyncio.Future[None]) -> None:
        self.recording = recording
        self.done = done
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._mode: BodyMode | None = None
        self._left = 0
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.recording.pieces.append((time.monotonic_ns(), data))
        mode = self._mode
        if mode is BodyMode.CHUNKED:
            self._tail = (self._tail + data)[-5:] if len(data) < 5 else data[-5:]
            if self._tail == _TAIL:
                self._end()
        elif mode is None:
            self._read_head(data)
        elif mode is BodyMode.LENGTH:
            self._left -= len(data)
            if self._left <= 0:
                self._end()

    def _read_head(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        parser = MessageParser()
        try:
            parser.feed(self._head[: end + 4])
        except FramingError as exc:
            self.recording.error = f"bad response head: {exc}"
            self._end()
            return
        rest = self._head[end + 4 :]
        self._mode = parser.mode
        if parser.complete:
            self._end()
        elif parser.mode is BodyMode.LENGTH:
            self._left = parser.length - len(rest)
            if self._left <= 0:
                self._end()
        elif parser.mode is BodyMode.CHUNKED:
            self._tail = rest[-5:]
            if self._tail == _TAIL:
                self._end()

    def eof_received(self) -> bool | None:
        self.recording.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.recording.eof = True
        if exc is not None and self.recording.error is None:
            self.recording.error = f"connection lost: {exc!r}"
        self._end()

    def _end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def fetch_stream(host: str, port: int, request: bytes, deadline_ns: int) -> Recording:
    """Send one request on a fresh connection and record the answer until it ends or the deadline passes."""
    loop = asyncio.get_running_loop()
    recording = Recording(started_ns=time.monotonic_ns())
    done: asyncio.Future[None] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        timeout = max(deadline_ns - time.monotonic_ns(), 0) / 1e9
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _Recorder(recording, done), host, port)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.write(request)
            await done
    except TimeoutError:
        recording.timed_out = True
    except OSError as exc:
        recording.error = f"connect: {exc!r}"
    finally:
        if transport is not None:
            transport.close()
    return recording


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request after parsing: timings in nanoseconds, and whether it arrived whole and in order."""

    status: int
    ttft_ns: int | None
    delays_ns: list[int]
    tokens: int
    in_order: bool
    complete: bool
    error: str | None
    last_recv_ns: int | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.complete


def _token_stamp(data: bytes) -> tuple[int, int] | None:
    """(seq, send_ns) from an event's ``content`` of ``t<seq>:<ns>``; None for events without a token."""
    if data == b"[DONE]":
        return None
    try:
        event = orjson.loads(data)
        content = event["choices"][0]["delta"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(content, str) or not content.startswith("t"):
        return None
    seq, _, ns = content[1:].partition(":")
    if not seq.isdigit() or not ns.isdigit():
        return None
    return int(seq), int(ns)


def token_pieces(
    recording: Recording, parser: MessageParser
) -> Iterator[tuple[int, bytes, list[tuple[int, int]], bool]]:
    """Each recorded piece with its arrival time, the (seq, send_ns) of the token events it completed, and whether
    it completed ``[DONE]``. ``parser`` is the caller's, to read the head and the end from; ``FramingError``
    propagates."""
    splitter = EventSplitter()
    for recv_ns, piece in recording.pieces:
        stamps: list[tuple[int, int]] = []
        done = False
        for body in parser.feed(piece):
            for event in splitter.feed(body):
                data = event_data(event)
                if data is None:
                    continue
                if data == b"[DONE]":
                    done = True
                    continue
                stamp = _token_stamp(data)
                if stamp is not None:
                    stamps.append(stamp)
        yield recv_ns, piece, stamps, done


def analyse(recording: Recording, expected_tokens: int) -> RequestResult:
    """Parse the recorded pieces and match each token event with the time its piece arrived."""
    parser = MessageParser()
    delays: list[int] = []
    ttft: int | None = None
    seqs: list[int] = []
    saw_done = False
    error = recording.error
    last_recv: int | None = None
    try:
        for recv_ns, _, stamps, done in token_pieces(recording, parser):
            saw_done = saw_done or done
            for seq, sent_ns in stamps:
                if ttft is None:
                    ttft = recv_ns - recording.started_ns
                seqs.append(seq)
                delays.append(recv_ns - sent_ns)
                last_recv = recv_ns
        if recording.eof:
            parser.feed_eof()
    except FramingError as exc:
        error = error or f"framing: {exc}"
    status = parser.head.status if parser.head is not None else 0
    if error is None and parser.head is not None and status != 200:
        error = f"status {status}"
    if error is None and parser.head is None and not recording.timed_out:
        error = "no response"
    complete = parser.complete and saw_done and len(seqs) == expected_tokens
    if recording.timed_out:
        complete = False
    in_order = seqs == list(range(len(seqs)))
    if error is None and complete and not in_order:
        error = "tokens out of order"
    return RequestResult(status, ttft, delays, len(seqs), in_order, complete, error, last_recv)


@dataclass(slots=True)
class ScenarioRun:
    scenario: Scenario
    started_ns: int
    ended_ns: int
    recordings: list[Recording]

    def results(self) -> list[RequestResult]:
        return [analyse(r, self.scenario.tokens) for r in self.recordings]


async def run_scenario(host: str, port: int, scenario: Scenario, bearer: str = "bench") -> ScenarioRun:
    """All streams at once, each sending its requests back to back; nothing outlives the deadline.

    ``bearer`` is sent as the API key to every target alike; only LiteLLM checks it.
    """
    request = scenario.request_bytes(host, port, bearer)
    # Every piece received is kept until the run ends; a full collection over them (tens of ms with 256 streams)
    # would stall the reads and show as a delay of whichever target was being measured.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return await _run_scenario(host, port, scenario, request)
    finally:
        if gc_was_on:
            gc.enable()


async def _run_scenario(host: str, port: int, scenario: Scenario, request: bytes) -> ScenarioRun:
    started = time.monotonic_ns()
    deadline = started + int(scenario.deadline_s * 1e9)
    recordings: list[Recording] = []

    async def client() -> None:
        for _ in range(scenario.requests):
            if time.monotonic_ns() >= deadline:
                recordings.append(Recording(started_ns=time.monotonic_ns(), timed_out=True))
                continue
            recordings.append(await fetch_stream(host, port, request, deadline))

    await asyncio.gather(*(client() for _ in range(scenario.streams)))
    return ScenarioRun(scenario, started, time.monotonic_ns(), recordings)
