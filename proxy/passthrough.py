"""The hot path: forward a request to an engine and stream the answer back, chunk by chunk, untouched.

The request goes out on one of the gateway's own connections to the engine (proxy/engine_http.py). Once the
answer's head is in (for the gateway's own server, opened on the client's side in that same read callback:
``_EarlyHead``), each read of the engine's socket is handed to ``ClientSink.write`` in the read callback:
stamp the time, write it to the client, note how long the write took. Nothing is parsed beyond HTTP's own framing,
joined across reads or held back (the only look inside is a short pattern search for the first generated token,
and only until it is found). When the client's socket is full, reading from the engine pauses until it drains,
which is the backpressure that reaches the engine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Literal

import orjson
from aiohttp import web

from flushgate.proxy.affinity import affinity_key
from flushgate.proxy.body import BodyStalled, OutgoingBody, arriving, read_ahead
from flushgate.proxy.client_side import AiohttpClient, ClientSide, Opened
from flushgate.proxy.engine_http import (
    EngineBroken,
    EngineConnectError,
    EngineConnection,
    EngineConnectTimeout,
    EngineIdle,
    EngineStale,
    Sink,
    request_head,
)
from flushgate.proxy.errors import error_response, terminal_event
from flushgate.proxy.headers import (
    REQUEST_ID,
    REQUEST_ID_FIELD,
    AnswerHead,
    StreamKind,
    new_request_id,
    upstream_request_lines,
)
from flushgate.proxy.pool import EngineMember
from flushgate.proxy.router import Router
from flushgate.proxy.state import GATEWAY, Gateway
from flushgate.proxy.upstream import Unavailable
from flushgate.record import RequestRecord
from flushgate.timings import FAST_CHUNK_S, RequestTimings, now

# A chunk that carries generated output: text, reasoning or the start of a tool call (OpenAI and Ollama shapes).
FIRST_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|reasoning|text|thinking|response)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[\s*\{'
)
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
TIMING_OPT_IN = b"x-flushgate-timing"  # "summary": the answer ends with a comment holding the request's record
CONTENT_CAP = 1 << 20  # --log-content keeps at most this much of each side
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when the client sent no body


def named_model(data: bytes) -> str | None:
    """The ``model`` a JSON body names, found without parsing it (``MODEL_FIELD``), or None."""
    found = MODEL_FIELD.search(data)
    return None if found is None else found.group(1).decode("utf-8", "replace")


async def forward(
    request: web.Request,
    body: bytes | None = None,
    received: float = 0.0,
    body_done: float = 0.0,
    model: str | None = None,
) -> web.StreamResponse:
    """Forward ``request``. A caller that already read the client's body passes it as ``body`` (possibly
    rewritten), with when the request arrived (``received``), when its body was read (``body_done``) and the
    model it names, if the caller looked (``model``: the body is then not searched again)."""
    client = AiohttpClient(request)
    return client.handler_result(await exchange(client, request.app[GATEWAY], body, received, body_done, model))


async def exchange(
    client: ClientSide,
    gateway: Gateway,
    body: bytes | None,
    received: float = 0.0,
    body_done: float = 0.0,
    model: str | None = None,
) -> web.Response | None:
    """One request through the gateway: None once the answer went to ``client``, else the response to send."""
    record = RequestRecord(
        request_id=client.header(REQUEST_ID_FIELD) or new_request_id(),
        method=client.method,
        path=client.path,
        model=model,
        timings=RequestTimings(start=received or now(), body_done=body_done),
    )
    gateway.enter()
    try:
        return await _exchange(client, gateway, record, body)
    except asyncio.CancelledError:
        record.outcome = "client_abort"  # the client's connection was lost: its server cancels the exchange
        raise
    finally:
        gateway.leave()
        record.timings.end = now()
        gateway.recorder.finish(record)


async def _exchange(
    client: ClientSide, gateway: Gateway, record: RequestRecord, body: bytes | None
) -> web.Response | None:
    refusal = gateway.refusal()
    if refusal is not None:
        return _refused(refusal, record)

    router = gateway.router
    assert router is not None  # Gateway makes one for its backend when none is given
    timings = record.timings
    header_lines = upstream_request_lines(client.raw_headers, record.request_id, client.remote)
    outgoing: OutgoingBody | None = None
    if body is not None:
        timings.body_done = timings.body_done or now()
        timings.bytes_in = client.content_length or len(body)
        if record.model is None:
            record.model = named_model(body)
        if gateway.log_content:
            record.content = {"request": body[:CONTENT_CAP].decode("utf-8", "replace")}
        outgoing = OutgoingBody(body, None)
    elif client.body_exists and router.several:
        try:
            outgoing = await read_ahead(_request_body(client, record, gateway))
        except BodyTooLarge as exc:
            return _too_large(record, exc, exc)
        except BodyStalled as exc:
            return _body_stalled(record, exc)
    elif not client.body_exists:
        timings.body_done = timings.start
    key: int | None = None
    if outgoing is not None and outgoing.complete and router.policy.mode == "prefix-affinity":
        key = affinity_key(outgoing.head)
    tried: list[EngineMember] = []
    timings.upstream_call = now()
    while True:
        member = router.pick(key, tried)
        if member is None:  # every engine left the pool or went loading/stopping since the refusal check
            return _refused(router.no_engine(), record)
        router.acquire(member)
        try:
            answer = await _attempt(client, gateway, record, member, header_lines, outgoing, tried)
            if answer == "resend":
                continue  # the same engine may well be picked again: nothing is held against it
            if answer is not False:
                return answer
        finally:
            router.release(member)
        tried.append(member)


async def _attempt(
    client: ClientSide,
    gateway: Gateway,
    record: RequestRecord,
    member: EngineMember,
    header_lines: bytes,
    body: OutgoingBody | None,
    tried: list[EngineMember],
) -> web.Response | Literal[False, "resend"] | None:
    """One try at one engine: its answer relayed (None), an error response, False to try another engine, or
    "resend" to pick again without holding anything against this one (a kept-alive connection it had closed)."""
    router = gateway.router
    assert router is not None
    base = member.url
    record.served_by = base
    engines = gateway.engines
    conn = engines.acquire(base, gateway.timeouts.connect, record.timings)  # maybe still connecting: see acquire
    uploading: asyncio.Future[None] | None = None
    unconnected = False  # the connection was never made: held against the engine once, as a connect failure
    try:
        data, stream, framed, framing = _outgoing(client, record, gateway, body)
        host = engines.address(base).host_header
        request_bytes = request_head(client.method, client.target, host, header_lines, framing)
        early = _EarlyHead() if client.opens_at_once and stream is None and client.method != "HEAD" else None
        on_head = None if early is None else early.handler(client, conn, gateway, record, member, tried, body)
        head = conn.send(request_bytes, data, gateway.timeouts.idle, on_head)
        if stream is not None:
            uploading = asyncio.ensure_future(conn.send_stream(stream, framed))
            await asyncio.wait((head, uploading), return_when=asyncio.FIRST_COMPLETED)
            failed = uploading.exception() if uploading.done() else None
            if failed is not None and (not head.done() or head.exception() is None):
                head.cancel()
                # The client's body, not the engine: no failover, nothing held against the engine.
                if isinstance(failed, BodyTooLarge):
                    return _too_large(record, failed, failed)
                if isinstance(failed, BodyStalled):
                    return _body_stalled(record, failed)
                return _unreadable_body(record, failed)
        try:
            await head
        except (EngineConnectError, EngineConnectTimeout) as exc:
            unconnected = True
            return _failed_before_answer(router, member, record, body, tried, exc)
        except (EngineBroken, EngineIdle) as exc:
            if isinstance(exc, EngineIdle) and uploading is not None and not uploading.done():
                # The engine was waiting for the rest of the body: the client's delay, not held against the engine.
                message = f"nothing reached the engine for {gateway.timeouts.idle:g} s before the body's end"
                return _body_stalled(record, BodyStalled(message))
            if isinstance(exc, EngineStale) and record.stale_resent is None and _replayable(body):
                record.stale_resent = base  # once: a second one is not a race with the engine's idle close
                return "resend"
            return _failed_before_answer(router, member, record, body, tried, exc)
        if early is not None and early.ran:  # the read callback has acted on the head
            if early.retry:
                return False
            await _relay(client, conn, gateway, record, early.opened)
            return None
        if _retried(router, member, conn, record, tried, body):
            return False
        if client.method == "HEAD":
            conn.end_without_body()
        await _relay(client, conn, gateway, record)
        return None
    finally:
        if uploading is not None and not uploading.done():
            uploading.cancel()
        if record.outcome in ("upstream_error", "idle_timeout") and not unconnected:
            router.failed(member, "broken")
        # Anything short of a complete read closes the engine connection, which is how vLLM learns to abort.
        if record.outcome == "completed":
            engines.release(conn)
        else:
            conn.abort()


def _retried(
    router: Router,
    member: EngineMember,
    conn: EngineConnection,
    record: RequestRecord,
    tried: list[EngineMember],
    body: OutgoingBody | None,
) -> bool:
    """The answer's head is in: the engine's health notes its status, and True if that status sends the request
    on to another engine (502/503/504 while one is left and the body can be sent again)."""
    router.answered(member, conn.status)
    return router.retries_status(member, conn.status, record.failover, [*tried, member], _replayable(body))


class _EarlyHead:
    """The answer's head acted on in the engine connection's read callback, where the client's answer can open
    without waiting (the front's clients): the head and the body bytes that came with it go out in that callback,
    not a turn of the event loop later, when the relaying task runs (under a burst of new requests, a long turn)."""

    __slots__ = ("opened", "retry")

    def __init__(self) -> None:
        self.retry = False  # the status sends the request to another engine
        self.opened: ClientSink | BaseException | None = None  # the sink, or what opening the answer raised

    @property
    def ran(self) -> bool:
        return self.retry or self.opened is not None

    def handler(
        self,
        client: ClientSide,
        conn: EngineConnection,
        gateway: Gateway,
        record: RequestRecord,
        member: EngineMember,
        tried: list[EngineMember],
        body: OutgoingBody | None,
    ) -> Callable[[], Sink | None]:
        router = gateway.router
        assert router is not None

        def on_head() -> Sink | None:
            try:
                if _retried(router, member, conn, record, tried, body):
                    self.retry = True
                    return None
                head = _answer_head(conn, record)
                sink = _sink(client.open_now(conn.status, conn.reason, head), client, conn, gateway, record, head.kind)
            except Exception as exc:  # never into the parser's callback: the relaying task meets it
                self.opened = exc
                return None
            self.opened = sink
            return sink.write

        return on_head


def _outgoing(
    client: ClientSide,
    record: RequestRecord,
    gateway: Gateway,
    body: OutgoingBody | None,
) -> tuple[bytes | None, AsyncIterator[bytes] | None, bool, bytes]:
    """The body to send at once or to stream, whether a stream goes in chunks, and the header that frames it (the
    client's own framing fields are never forwarded)."""
    payload: bytes | AsyncIterator[bytes] | None = None
    if body is not None:
        payload = body.payload()
    elif client.body_exists:
        payload = _request_body(client, record, gateway)
    if isinstance(payload, bytes):
        return payload, None, False, b"Content-Length: %d\r\n" % len(payload)
    if payload is not None:
        if client.content_length is not None:  # the client's own length still holds for the bytes that stream on
            return None, payload, False, b"Content-Length: %d\r\n" % client.content_length
        return None, payload, True, b"Transfer-Encoding: chunked\r\n"
    return None, None, False, b"Content-Length: 0\r\n" if client.method in BODY_METHODS else b""


def _failed_before_answer(
    router: Router,
    member: EngineMember,
    record: RequestRecord,
    body: OutgoingBody | None,
    tried: list[EngineMember],
    exc: BaseException,
) -> web.Response | Literal[False]:
    """The engine failed before its answer's head: try another (False) while allowed, else an error response."""
    failure = router.failed_before_answer(member, exc, record.failover, [*tried, member], _replayable(body))
    if failure is None:
        return False
    record.outcome = "upstream_error"
    record.error = repr(exc)
    record.status = failure.status
    return error_response(failure.status, failure.message, code=failure.code, headers={REQUEST_ID: record.request_id})


def _replayable(body: OutgoingBody | None) -> bool:
    """The body can be sent to another engine (or there is none)."""
    return body is None or body.replayable


def _refused(refusal: Unavailable, record: RequestRecord) -> web.Response:
    """503 with ``Retry-After``: the gateway is draining, or no engine can take the request yet."""
    record.outcome = "rejected"
    record.status = 503
    return error_response(
        503,
        refusal.message,
        code=refusal.code,
        headers={"Retry-After": str(refusal.retry_after_s), REQUEST_ID: record.request_id},
    )


def _too_large(record: RequestRecord, reason: BodyTooLarge, raised: BaseException) -> web.Response:
    record.outcome = "rejected"
    record.error = repr(raised)
    record.status = 413
    headers = {REQUEST_ID: record.request_id}
    return error_response(413, str(reason), type_="invalid_request_error", code="request_too_large", headers=headers)


def _unreadable_body(record: RequestRecord, raised: BaseException) -> web.Response:
    """The client's streamed body broke off or was malformed (bad chunk framing, fewer bytes than announced)."""
    record.outcome = "rejected"
    record.error = repr(raised)
    record.status = 400
    return error_response(
        400,
        f"the request body could not be read: {raised}",
        type_="invalid_request_error",
        code="request_body_unreadable",
        headers={REQUEST_ID: record.request_id},
    )


def _body_stalled(record: RequestRecord, raised: BodyStalled) -> web.Response:
    """408, as nginx's client_body_timeout answers: the streamed body stopped before its end. aiohttp's parser
    also leaves a body whose chunk framing breaks waiting for bytes that never come, so it ends here too."""
    record.outcome = "rejected"
    record.error = repr(raised)
    record.status = 408
    response = error_response(
        408,
        str(raised),
        type_="invalid_request_error",
        code="request_body_timeout",
        headers={REQUEST_ID: record.request_id},
    )
    response.force_close()  # rather than wait (aiohttp's lingering read) for the rest of a body that is not coming
    return response


class BodyTooLarge(Exception):
    """A streamed request body grew past the gateway's limit (a declared one is refused before it is read)."""


async def _request_body(client: ClientSide, record: RequestRecord, gateway: Gateway) -> AsyncIterator[bytes]:
    """The client's body as it arrives, noting its size, its end, and the model it names."""
    timings = record.timings
    limit, gap_s = gateway.max_body_bytes, gateway.body_timeout
    kept = bytearray() if gateway.log_content else None
    async for chunk in arriving(client.body_chunks(), gap_s):
        timings.bytes_in += len(chunk)
        if limit and timings.bytes_in > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes, the most this gateway takes")
        if record.model is None:
            record.model = named_model(chunk)
        if kept is not None and len(kept) < CONTENT_CAP:
            kept += chunk[: CONTENT_CAP - len(kept)]
        yield chunk
    timings.body_done = now()
    if kept is not None:
        record.content = {"request": kept.decode("utf-8", "replace")}


def _answer_head(conn: EngineConnection, record: RequestRecord) -> AnswerHead:
    """The head of the client's answer, once the engine's is in."""
    timings = record.timings
    timings.upstream_headers = now()
    record.status = conn.status
    head = AnswerHead(conn.raw_headers, record.request_id)
    record.stream = head.kind is not None
    head.add("Server-Timing", _server_timing(timings))
    return head


def _sink(
    opened: Opened,
    client: ClientSide,
    conn: EngineConnection,
    gateway: Gateway,
    record: RequestRecord,
    kind: StreamKind | None,
) -> ClientSink:
    # The body's end goes with its last bytes unless the timing comment is still to come after them.
    comment = kind == "sse" and (gateway.timing_summary or client.header(TIMING_OPT_IN) == "summary")
    return ClientSink(
        opened,
        conn,
        record.timings,
        kind=kind,
        hops=gateway.hop_timing,
        keep=gateway.log_content,
        ends=not comment,
    )


async def _relay(
    client: ClientSide,
    conn: EngineConnection,
    gateway: Gateway,
    record: RequestRecord,
    early: ClientSink | BaseException | None = None,
) -> None:
    """The answer's body to the client until it ends; ``early``: the answer was opened in the read callback."""
    sink: ClientSink | None = None
    try:
        if isinstance(early, BaseException):
            raise early
        if early is None:
            head = _answer_head(conn, record)
            sink = _sink(await client.open(conn.status, conn.reason, head), client, conn, gateway, record, head.kind)
        else:
            sink = early
        kind = sink.kind
        event = conn.attach(sink.write)
        while True:
            try:
                ended = await event
            except (EngineBroken, EngineIdle) as exc:
                await _end_broken_stream(client, kind, gateway, record, exc, sink.last)
                return
            if ended:
                break
            paused = now()  # the client's socket is full: reading from the engine waits until it drains
            await client.drain()
            sink.blocked_for(now() - paused)
            conn.resume()
            event = conn.next_event()
        sink.add_sums()
        if kind == "sse" and (gateway.timing_summary or client.header(TIMING_OPT_IN) == "summary"):
            await client.write(await _timing_comment(gateway, record))
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError: the client went away
        record.outcome = "client_abort"
        record.error = repr(exc)
    finally:
        if sink is not None:
            sink.add_sums()
            if sink.kept is not None:
                record.content = {**(record.content or {}), "response": sink.kept.decode("utf-8", "replace")}


class ClientSink:
    """Writes what each read of the engine's socket brought to the client's socket, from the read callback.

    The hot path: stamp the arrival, write (framing it as one HTTP chunk when the client's answer is chunked),
    note how long the write took. A write never waits; when the client's socket is full, reading from the engine
    pauses (``conn.pause``) and the relaying task drains the client's side before reading resumes. The answer's
    head, where the client's server left it to the sink, goes with the first write, and its ending (the last
    chunk) with the read that ends the engine's answer: one write each, not two.
    """

    __slots__ = (
        "_arrived",
        "_blocked",
        "_chunked",
        "_conn",
        "_ended",
        "_ending",
        "_events",
        "_fast",
        "_head",
        "_hops",
        "_last_slow",
        "_last_took",
        "_protocol",
        "_separator",
        "_slow",
        "_timings",
        "_token_seen",
        "_transport",
        "kept",
        "kind",
        "last",
    )

    def __init__(
        self,
        opened: Opened,
        conn: EngineConnection,
        timings: RequestTimings,
        *,
        kind: StreamKind | None,
        hops: bool,
        keep: bool,
        ends: bool = True,
    ) -> None:
        self.kind = kind
        self._transport = opened.transport
        self._protocol = opened.flow  # the server's protocol: ``writing_paused`` is the transport's own signal
        self._chunked = opened.chunked
        self._head = opened.head
        self._ending = opened.ending if ends else b""
        self._ended = opened.ended
        self._conn = conn
        self._timings = timings
        self._arrived = timings.arrivals.append
        self._slow = timings.slow_chunks.append
        self._hops = hops
        self._separator = b"\n\n" if kind == "sse" else b"\n"
        self._token_seen = kind is None or not hops  # only event streams are searched for their first token
        self.kept = bytearray() if keep else None
        self.last = b""
        # Per-chunk sums live here while the stream runs and are added to the record when it ends.
        self._blocked = 0.0
        self._fast = 0
        self._events = 0
        self._last_took = 0.0
        self._last_slow = False

    def write(self, chunk: bytes, ends: bool) -> None:
        """``chunk``: the body bytes of one read (none where it brought only the head or the end);
        ``ends``: the engine's answer is complete."""
        transport = self._transport
        if transport.is_closing():  # the client has gone; its handler is being cancelled
            self._conn.pause()
            return
        if not chunk:
            self._write_bare(ends)
            return
        self.last = chunk
        self._timings.bytes_out += len(chunk)
        if self.kept is not None and len(self.kept) < CONTENT_CAP:
            self.kept += chunk[: CONTENT_CAP - len(self.kept)]
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk
        if self._head:
            data = self._head + data
            self._head = b""
        if ends and self._ending:
            data += self._close()
        if not self._hops:
            transport.write(data)
        else:
            stamp = now()
            self._arrived(stamp)
            transport.write(data)
            took = now() - stamp
            self._blocked += took
            self._last_took = took
            if took > FAST_CHUNK_S:
                self._slow(took)
                self._last_slow = True
            else:
                self._fast += 1
                self._last_slow = False
            self._events += chunk.count(self._separator)
            if not self._token_seen and FIRST_TOKEN.search(chunk):
                self._timings.first_token = stamp
                self._token_seen = True
        if self._protocol.writing_paused:
            self._conn.pause()

    def _write_bare(self, ends: bool) -> None:
        """A read without body bytes: the head still to send, and the ending if the answer is complete."""
        data = self._head + (self._close() if ends else b"")
        self._head = b""
        if data:
            self._transport.write(data)
            if self._protocol.writing_paused:
                self._conn.pause()

    def _close(self) -> bytes:
        ending, self._ending = self._ending, b""
        if ending and self._ended is not None:
            self._ended()
        return ending

    def blocked_for(self, seconds: float) -> None:
        """The client kept the stream waiting: added to the write that filled its socket."""
        if not self._hops or seconds <= 0:
            return
        self._blocked += seconds
        slow = self._timings.slow_chunks
        if slow and self._last_slow:
            slow[-1] += seconds
        elif self._fast:
            self._fast -= 1
            self._slow(self._last_took + seconds)

    def add_sums(self) -> None:
        timings = self._timings
        timings.write_blocked += self._blocked
        timings.fast_chunks += self._fast
        timings.events += self._events
        self._blocked, self._fast, self._events = 0.0, 0, 0


def _server_timing(t: RequestTimings) -> str:
    """What is known before the body starts: reading the client's body, connecting, the engine's first byte."""
    parts = []
    if t.body_done:
        parts.append(f"client-body;dur={(t.body_done - t.start) * 1000:.3f}")
    if t.connect_end:
        parts.append(f"upstream-connect;dur={(t.connect_end - t.connect_start) * 1000:.3f}")
    elif t.connection_reused:
        parts.append('upstream-connect;dur=0;desc="reused"')
    sent = max(t.body_done, t.connect_end, t.start)
    parts.append(f"engine-ttfb;dur={(t.upstream_headers - sent) * 1000:.3f}")
    return ", ".join(parts)


async def _timing_comment(gateway: Gateway, record: RequestRecord) -> bytes:
    """An SSE comment line (clients ignore it) with the request's record so far, engine split included."""
    await gateway.recorder.join_engine(record, timeout_s=0.5)
    record.timings.end = now()
    fields = record.fields()
    fields.pop("content", None)
    return b": flushgate-timing " + orjson.dumps(fields) + b"\n\n"


async def _end_broken_stream(
    client: ClientSide,
    kind: StreamKind | None,
    gateway: Gateway,
    record: RequestRecord,
    exc: BaseException,
    last: bytes,
) -> None:
    """Make an unfinished upstream body unmistakable to the client.

    Event streams get a final error event. Any other body is cut off without its end marker (no last chunk,
    or fewer bytes than Content-Length), so an HTTP client reports a truncated response.
    """
    idle = isinstance(exc, TimeoutError)
    record.outcome = "idle_timeout" if idle else "upstream_error"
    record.error = repr(exc)
    if idle:
        message = f"the engine sent nothing for {gateway.timeouts.idle:g} s; the stream was ended"
        code = "idle_timeout"
    else:
        engine = record.served_by or gateway.backend.base_url
        message = f"the engine at {engine} ended the stream before it was complete"
        code = "upstream_disconnected"
    if kind is not None:
        separator = b"\n\n" if kind == "sse" else b"\n"
        # An event cut in the middle is closed first, so the error is an event of its own.
        await client.write(
            (separator if last and not last.endswith(separator) else b"") + terminal_event(kind, message, code)
        )
    else:
        client.cut()
