"""HTTP/1.1 to the engine on a bare asyncio protocol, so each read of the engine's socket is written on to the
client from the read callback itself.

aiohttp's client hands every read to a ``StreamReader`` and wakes the relaying task to take it out again: a
future, a task step and the reader's bookkeeping per chunk, which under hundreds of streams was most of the
gateway's CPU. Here llhttp (``httptools``) finds the body in what one read brought, and the response's sink
gets it in the same callback: one parse, one write. The relaying task wakes only when the answer ends, or when
the client's socket is full and the engine must wait (backpressure: reading from the engine pauses until the
client's side drains).

One ``EngineConnection`` carries one exchange at a time; ``EngineConnections`` keeps the idle ones per engine.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final, NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from flushgate.timings import RequestTimings, now

Sink = Callable[[bytes, bool], None]  # the body bytes of one read, and whether the answer is complete; never blocks
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class EngineConnectError(Exception):
    """The connection to the engine could not be made."""

    def __init__(self, base: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {base}: {os_error.strerror or os_error}")
        self.os_error = os_error


class EngineConnectTimeout(TimeoutError):
    """Connecting to the engine took longer than the connect timeout."""


class EngineIdle(TimeoutError):
    """The engine sent nothing for the idle timeout (before or within its answer)."""


class EngineBroken(Exception):
    """The engine closed the connection, or sent something that is not HTTP, before its answer was complete."""


class EngineStale(EngineBroken):
    """A connection that had waited in the pool (after an answer, or opened ahead) closed with no byte of an answer:
    the engine closed it as idle while the request was on its way, so the request was not taken and can be sent
    again on a new connection."""


class EngineAddress(NamedTuple):
    host: str
    port: int
    tls: ssl.SSLContext | None
    host_header: str


class EngineConnection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request and its answer at a time."""

    def __init__(self, key: str, pool: EngineConnections) -> None:
        self.key = key
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = ""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] | None = None
        self._event: asyncio.Future[bool] | None = None  # True: the answer ended; False: the client must drain
        self._sink: Sink | None = None
        self._on_head: Callable[[], Sink | None] | None = None
        self._pieces: list[bytes] = []
        self._sink_fresh = False  # a sink was just given: it is called once even without body bytes
        self.complete = False
        self._interim = False
        self._until_close = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._idle_s: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self._writable: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0  # when it was last parked; 0.0 until then (one still being made is not idle)
        # Claimed while still connecting (a connection opened ahead): the request waits here, not in a task.
        self.claimed = False
        self._unsent: bytes | None = None  # written the moment the connection is made
        self._claim_timings: RequestTimings | None = None  # its connect_end is stamped then too
        self._made: asyncio.Future[None] | None = None  # what a streamed upload waits on until then
        self._abandoned = False  # aborted before the connection was made: closed as soon as it is
        self.exchanges = 0  # requests sent on it: none yet, and it is new to the request that takes it
        self._answered = False  # a byte of the current exchange's answer has come

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        if self._abandoned:
            self.transport.abort()
            return
        if self._claim_timings is not None:
            self._claim_timings.connect_end = now()
            self._claim_timings = None
        if self._unsent is not None:  # a request claimed this connection while it was being made
            data, self._unsent = self._unsent, None
            self.transport.write(data)
        if self._made is not None and not self._made.done():
            self._made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._answered = True
        parser = self._parser
        if parser is None:  # bytes while no request is out: the connection cannot be trusted any more
            self.abort()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._flush()  # what was valid before the fault still goes to the client
            self._fail(EngineBroken(f"the engine's answer is not valid HTTP: {exc}"))
            self.abort()
            return
        self._flush()
        if self.complete:
            self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._cancel_timer()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        parser, self._parser = self._parser, None  # the parser refers back to this protocol: no cycle is left
        self._on_head = None  # nor the head's handler, which holds this connection, when no head came
        if parser is None or self.complete:
            return
        head = self._head
        if head is not None and head.done() and self._until_close and exc is None:
            self.complete = True  # a body without length or chunks ends when the engine closes
            self._end()
            return
        reason = f": {exc}" if exc else ""
        if self.idle_since and not self._answered:  # it waited in the pool, where the engine may close it
            self._fail(EngineStale(f"the engine closed a kept-alive connection without answering{reason}"))
            return
        self._fail(EngineBroken(f"the engine closed the connection before the answer was complete{reason}"))

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the answer: the connection is out of step with its requests
            self._keep_alive = False

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:  # the head of bytes after the answer: nothing of it is taken
            return
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (e.g. 103); the real one follows
            self._interim = True
            self._raw_headers = []
            return
        self.status = status
        self._keep_alive = parser.should_keep_alive()
        names = {name.lower() for name, _ in self._raw_headers}
        self._until_close = (
            b"content-length" not in names and b"transfer-encoding" not in names and status not in _NO_BODY_STATUSES
        )
        on_head, self._on_head = self._on_head, None
        if on_head is not None:  # the body bytes of this very read then go to the sink it returns
            self._sink = on_head()
            self._sink_fresh = self._sink is not None
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self.complete:  # bytes after the answer are not part of it (the connection is then not reused)
            self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True

    # -- the exchange -------------------------------------------------------------------------------------------

    def send(
        self,
        head: bytes,
        body: bytes | None,
        idle_s: float | None,
        on_head: Callable[[], Sink | None] | None = None,
    ) -> asyncio.Future[None]:
        """Write a request; the future is done when the answer's head has arrived.

        ``on_head``, if given, is called from the read callback the moment the head is in (it must not raise): a
        sink it returns gets the body from then on, the bytes that came with the head included, a turn of the
        event loop before the task waiting on the future runs."""
        self._parser = httptools.HttpResponseParser(self)
        self.status, self.reason, self._raw_headers, self._pieces = 0, "", [], []
        self.complete = self._interim = self._until_close = False
        self._sink, self._error, self._event, self._on_head = None, None, None, on_head
        self._sink_fresh = self._answered = False
        self.exchanges += 1
        self._head = head_future = self._loop.create_future()
        self._idle_s = idle_s
        self._last_read = self._loop.time()
        due = self._last_read + idle_s if idle_s else 0.0
        if self._timer is not None and (not idle_s or self._timer.when() > due):
            self._cancel_timer()  # not wanted now, or due later than this exchange allows
        if self._timer is None and idle_s:  # a check left from the exchange before reads ``_last_read`` when due
            self._timer = self._loop.call_at(due, self._check_idle)
        data = head + body if body else head
        if self.transport is None:  # still connecting: sent from connection_made
            self._unsent = data
        else:
            self.transport.write(data)
        return head_future

    async def send_stream(self, chunks: AsyncIterator[bytes], framed: bool) -> None:
        """Write the rest of a request body as it arrives, waiting while the engine's socket is full."""
        if self.transport is None:
            self._made = self._loop.create_future()
            await self._made
        assert self.transport is not None
        write = self.transport.write
        async for chunk in chunks:
            if self.closed:
                return
            if chunk:
                write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if framed else chunk)
            if self._writable is not None:
                await self._writable
        if framed and not self.closed:
            write(b"0\r\n\r\n")

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's header fields as read (the head of its last interim answer dropped)."""
        return self._raw_headers

    def attach(self, sink: Sink) -> asyncio.Future[bool]:
        """From now on the body goes to ``sink``; what came with the head goes at once. The future answers
        True when the body has ended, False when the client's socket is full (drain, then ``resume``), and
        raises ``EngineBroken`` or ``EngineIdle`` if the answer cannot complete."""
        self._sink = sink
        self._sink_fresh = True
        self._flush()
        return self.next_event()

    def next_event(self) -> asyncio.Future[bool]:
        """What the relaying task waits for next: see ``attach``; what is already known answers at once."""
        self._event = event = self._loop.create_future()
        if self._error is not None:
            event.set_exception(self._error)
        elif self.reading_paused:
            event.set_result(False)
        elif self.complete:
            event.set_result(True)
        return event

    def pause(self) -> None:
        """The client's socket is full: stop reading from the engine and wake the relaying task to drain it."""
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
            if self._event is not None and not self._event.done():
                self._event.set_result(False)

    def resume(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self._last_read = self._loop.time()  # waiting for the client is not the engine's silence
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def end_without_body(self) -> None:
        """An answer to HEAD: no body follows, whatever its head says, and llhttp cannot be told so."""
        self.complete = True
        self._keep_alive = False
        self._cancel_timer()

    def park(self) -> None:
        """Between exchanges: any byte the engine sends now is a fault, and the keep-alive clock runs."""
        self._parser = None
        self._sink = self._head = self._event = self._on_head = None  # nothing of the exchange is kept by the pool
        self.idle_since = self._loop.time()

    def idle_for(self) -> float:
        """Seconds since ``park``, on the loop's clock (kept: asking for the running loop costs a system call)."""
        return self._loop.time() - self.idle_since

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed and not self.reading_paused

    def abort(self) -> None:
        """Close at once (RST): how the engine learns that a request's client has gone."""
        self._cancel_timer()
        for waiting in (self._head, self._event):  # nobody waits for this exchange any more
            if waiting is not None and not waiting.done():
                waiting.cancel()
        if self.transport is None:
            self._abandoned = True
            self._unsent = None
        elif not self.closed:
            self.transport.abort()

    def claim(self, timings: RequestTimings) -> None:
        """A request takes this connection: made already, or its ``connect_end`` is stamped when it is."""
        self.claimed = True
        if self.transport is not None:
            timings.connect_end = timings.connect_start
        else:
            self._claim_timings = timings

    def connect_failed(self, error: BaseException) -> None:
        """The connection could not be made: a request that claimed it meets ``error`` where it waits."""
        self.closed = True
        self._unsent = None
        self._fail(error)
        if self._made is not None and not self._made.done():
            self._made.set_exception(error)

    # -- internals ----------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        pieces = self._pieces
        sink = self._sink
        if sink is not None and (pieces or self.complete or self._sink_fresh):
            self._sink_fresh = False
            sink(pieces[0] if len(pieces) == 1 else b"".join(pieces), self.complete)
            pieces.clear()

    def _end(self) -> None:
        # The idle check stays armed: when it comes due the answer is complete (it stops) or the connection is in a
        # later exchange (it checks that one). One timer made per connection instead of one per request.
        event = self._event
        if event is not None and not event.done():
            event.set_result(True)

    def _fail(self, error: BaseException) -> None:
        self._cancel_timer()
        if self._error is None:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
            return
        event = self._event
        if event is not None and not event.done():
            event.set_exception(error)

    def _check_idle(self) -> None:
        idle_s = self._idle_s
        if self.complete or not idle_s:  # between exchanges: nothing to wait for; ``send`` arms it again
            self._timer = None
            return
        if self.reading_paused:
            due = self._loop.time() + idle_s
        else:
            due = self._last_read + idle_s
            if self._loop.time() >= due:
                self._timer = None
                self._fail(EngineIdle(f"the engine sent nothing for {idle_s:g} s"))
                self.abort()
                return
        self._timer = self._loop.call_at(due, self._check_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EngineConnections:
    """Keep-alive connections per engine base URL: the most recently used idle one is taken first."""

    def __init__(self, keepalive_s: float) -> None:
        self._keepalive_s = keepalive_s
        self._idle: dict[str, list[EngineConnection]] = {}
        self._addresses: dict[str, EngineAddress] = {}
        self._open: set[EngineConnection] = set()
        self._opening: dict[str, deque[EngineConnection]] = {}  # being made, not yet claimed by a request
        self._connecting: set[asyncio.Task[None]] = set()

    def acquire(self, base: str, connect_s: float, timings: RequestTimings) -> EngineConnection:
        """An idle connection, else one being made (opened ahead, or now): a request sent on one still being made
        goes out the moment it is made, from the callback that says so; an error making it is met where the
        request waits for the answer's head (``EngineConnectError``, ``EngineConnectTimeout``)."""
        conn = self.take_idle(base)
        if conn is not None and conn.exchanges:
            timings.connection_reused = True
            return conn
        timings.connect_start = now()
        timings.connection_reused = False
        if conn is None:  # else one opened ahead and made already, never used: new to this request, not waited for
            opening = self._opening.get(base)
            while opening and opening[0].closed:  # made, then closed by the engine before a request came for it
                opening.popleft()
            conn = opening.popleft() if opening else self._start(base, connect_s)
        conn.claim(timings)
        return conn

    def open_ahead(self, base: str, connect_s: float, wanted: int) -> None:
        """Start a connection to ``base`` before a request needs it, unless ``wanted`` are already idle or opening.

        Under a burst of new clients the connect otherwise waits a turn of an event loop busy with the burst after
        the request was read (p50 9.7 ms of a 256-stream burst here); opened when the client connects, it overlaps
        the wait for the request. A request for ``base`` takes the oldest one still opening (``acquire``); one
        nobody takes is parked like any idle connection, so it closes after the keep-alive time if unused.
        """
        opening = self._opening.get(base)
        if opening is None:
            opening = self._opening[base] = deque()
        if len(opening) + len(self._idle.get(base, ())) >= wanted:
            return
        opening.append(self._start(base, connect_s))

    def _start(self, base: str, connect_s: float) -> EngineConnection:
        conn = EngineConnection(base, self)
        task = asyncio.get_running_loop().create_task(self._connect(conn, connect_s))
        self._connecting.add(task)
        task.add_done_callback(lambda done: self._connect_done(conn, done))
        return conn

    def _connect_done(self, conn: EngineConnection, task: asyncio.Task[None]) -> None:
        self._connecting.discard(task)
        error = None if task.cancelled() else task.exception()
        if not conn.claimed:
            opening = self._opening.get(conn.key)
            if opening is not None and conn in opening:
                opening.remove(conn)
        if task.cancelled() or error is not None:
            conn.connect_failed(error or EngineConnectError(conn.key, OSError("the connect was cancelled")))
        elif not conn.claimed and not conn.closed:
            conn.park()
            self._idle.setdefault(conn.key, []).append(conn)

    async def _connect(self, conn: EngineConnection, connect_s: float) -> None:
        loop = asyncio.get_running_loop()
        host, port, context, _ = self.address(conn.key)
        try:
            async with asyncio.timeout(connect_s):
                await loop.create_connection(
                    lambda: conn, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError as exc:
            raise EngineConnectTimeout(f"connecting to {conn.key} took over {connect_s:g} s") from exc
        except OSError as exc:
            raise EngineConnectError(conn.key, exc) from exc
        if not conn.closed:  # an abandoned one may be gone already
            self._open.add(conn)

    def take_idle(self, base: str) -> EngineConnection | None:
        """The most recently parked connection to ``base`` that is still open and fresh, if there is one."""
        idle = self._idle.get(base)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_for() >= self._keepalive_s:
                conn.abort()
                continue
            return conn
        return None

    def release(self, conn: EngineConnection) -> None:
        """Back to the pool if its answer was read to the end on a keep-alive connection, else closed."""
        if not conn.reusable:
            conn.abort()
            return
        conn.park()
        self._idle.setdefault(conn.key, []).append(conn)

    def idle_count(self, base: str) -> int:
        return sum(not conn.closed for conn in self._idle.get(base, ()))

    def forget(self, conn: EngineConnection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def address(self, base: str) -> EngineAddress:
        """Host, port, TLS context and Host header of ``base`` (a URL without a path), worked out once."""
        found = self._addresses.get(base)
        if found is None:
            parts = urlsplit(base)
            tls = parts.scheme == "https"
            host = parts.hostname or "localhost"
            port = parts.port or (443 if tls else 80)
            shown = f"[{host}]" if ":" in host else host
            host_header = shown if parts.port is None else f"{shown}:{port}"
            context = ssl.create_default_context() if tls else None
            found = EngineAddress(host, port, context, host_header)
            self._addresses[base] = found
        return found

    def close(self) -> None:
        for task in list(self._connecting):
            task.cancel()
        self._opening.clear()
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()


def request_head(method: str, target: str, host: str, lines: bytes, framing: bytes) -> bytes:
    """The request line, ``Host``, the forwarded header ``lines``, the body's ``framing``, the blank line."""
    start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
    return start + lines + framing + b"\r\n"
