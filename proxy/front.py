"""The hot route on the gateway's own HTTP/1.1 server protocol; every other request goes to aiohttp's.

Under a burst of new streams the gateway's cost per request decides how long the last of them waits for its
first token. aiohttp's server builds a request object, a task and a middleware chain per request before the
handler runs; here llhttp (``httptools``) parses the head in the read callback and the pass-through
(proxy/passthrough.py, the same code aiohttp's route runs) starts at once.

Taken here: a whole ``POST`` to a forwarded route, with a ``Content-Length`` body of at most ``BODY_CAP`` bytes,
and ``GET /v1/models`` (clients list the models first, often on the connection they then chat on), when they
pass the gateway's guards as they stand (API key, route allowlist, body size, concurrency cap). Anything
else, from a browser's CORS request or an ``Expect`` header to a malformed head, is handed to aiohttp with the
bytes read so far, and that connection is aiohttp's from then on: one server answers each request in full, with
every rule it has. A head over the size limits is the exception: the front reads heads, so it refuses them
itself, in the JSON shape of the API the path belongs to (431, or 414 for the request target).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools
from aiohttp import hdrs, web
from multidict import CIMultiDict

from flushgate.proxy import body as outgoing_body
from flushgate.proxy import eager
from flushgate.proxy.auth import bearer
from flushgate.proxy.client_side import CLIENT_WRITE_HIGH, Opened
from flushgate.proxy.cors import CorsPolicy
from flushgate.proxy.errors import error_response
from flushgate.proxy.headers import AnswerHead, RawHeaders, first_value, message_head
from flushgate.proxy.model_aliases import list_models, names_alias
from flushgate.proxy.ollama.models import ModelRegistry
from flushgate.proxy.pacing import StartPacer
from flushgate.proxy.passthrough import exchange, named_model
from flushgate.proxy.refusal import refusal_body
from flushgate.proxy.security import Guards
from flushgate.proxy.state import Gateway
from flushgate.timings import now

BODY_CAP = 1 << 20  # larger bodies go to aiohttp's server, which streams them on instead of reading them first
FORWARDED_PATHS = frozenset({b"/tokenize", b"/detokenize"})  # and every path under /v1/ (proxy/app.py)
_NO_BODY = frozenset({204, 304})
_LAST_CHUNK = b"0\r\n\r\n"
# Request headers that need a rule of aiohttp's server (or the CORS guard's) to be answered right.
_HANDED_OVER_HEADERS = frozenset({b"origin", b"expect", b"transfer-encoding", b"upgrade"})
Refusal = tuple[int, str, str]  # status, message, code of a request the front answers while reading it


@dataclass(slots=True)
class FrontStats:
    """How many requests the front answered itself, and how many connections it handed to aiohttp."""

    answered: int = 0
    handed_over: int = 0


class Front:
    """What every client connection shares: the gateway, its guards, aiohttp's server for what is handed over."""

    def __init__(
        self,
        gateway: Gateway,
        guards: Guards,
        models: ModelRegistry,
        aiohttp_server: Callable[[], asyncio.Protocol],
        *,
        max_header_bytes: int,
        max_headers: int,
        header_timeout: float,
        body_timeout: float,
    ) -> None:
        self.gateway = gateway
        self.guards = guards
        self.models = models
        self.aiohttp_server = aiohttp_server
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.connections: set[ClientConnection] = set()
        self.stats = FrontStats()
        self.loop = asyncio.get_running_loop()  # kept: asking for it costs a system call (CPython's getpid check)
        self.pacer = StartPacer(self.loop)

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def open_engine_connection_ahead(self) -> None:
        """A new client will most likely send a request: its engine connection is opened while the request is on
        its way (at most one engine connection for each client connection, spread over the engines)."""
        gateway = self.gateway
        router = gateway.router
        assert router is not None
        if gateway.draining:
            return
        member = router.likely_next()
        if member is not None:
            wanted = -(-len(self.connections) // len(router.pool.members))
            gateway.engines.open_ahead(member.url, gateway.timeouts.connect, wanted)

    def close(self) -> None:
        """Close every connection still served here (the drain has let the in-flight requests finish)."""
        for connection in list(self.connections):
            connection.close()


class FrontRequest:
    """One request taken by the front: the pass-through's view of the client (``ClientSide``)."""

    opens_at_once = True  # the answer's head is one write on the client's transport

    __slots__ = ("_conn", "_cors", "_headers", "body", "body_exists", "chunked", "content_length", "cut_off", "ended",
                 "method", "opened", "path", "raw_headers", "remote", "target")  # fmt: skip

    def __init__(
        self,
        conn: ClientConnection,
        cors: CorsPolicy,
        method: str,
        target: str,
        raw_headers: RawHeaders,
        body: bytes,
    ) -> None:
        self._conn = conn
        self._cors = cors
        self.method = method
        self.target = target
        self.path = unquote(target.split("?", 1)[0])
        self.raw_headers = raw_headers  # every value UTF-8: the front hands other requests over
        self._headers: CIMultiDict[str] | None = None
        self.remote = conn.remote
        self.body = body
        self.content_length: int | None = len(body) if body else None
        self.body_exists = bool(body)
        self.chunked = False
        self.opened = False
        self.ended = False  # the last chunk is out
        self.cut_off = False

    @property
    def headers(self) -> CIMultiDict[str]:
        """The fields as text, made when first asked for: forwarding takes them as read (``raw_headers``)."""
        if self._headers is None:
            self._headers = CIMultiDict((name.decode(), value.decode()) for name, value in self.raw_headers)
        return self._headers

    def header(self, name: bytes) -> str | None:
        return first_value(self.raw_headers, name)

    async def body_chunks(self) -> AsyncIterator[bytes]:
        yield self.body  # the front reads every body whole before the exchange begins

    async def open(self, status: int, reason: str, head: AnswerHead) -> Opened:
        return self.open_now(status, reason, head)

    def open_now(self, status: int, reason: str, head: AnswerHead) -> Opened:
        """The head goes out with the first body bytes and the last chunk with the last ones, each pair in one
        write (one system call, one TCP segment), by the writer the relay gives it to. The head is written from
        the fields as read, not decoded: the engine's CORS fields are already out of it (proxy/headers.py)."""
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        lines = _status_line(status, reason) + head.lines()
        if self._cors.varies_by_origin:
            lines += b"Vary: Origin\r\n"
        bodiless = status in _NO_BODY or status < 200
        self.chunked = not bodiless and not head.has_length
        if self.chunked:
            lines += b"Transfer-Encoding: chunked\r\n"
        if not conn.keep_alive:
            lines += b"Connection: close\r\n"
        self.opened = True
        ending = _LAST_CHUNK if self.chunked else b""
        return Opened(transport, conn, self.chunked, lines + b"\r\n", ending, self._body_ended)

    def _body_ended(self) -> None:
        self.ended = True

    def finish(self) -> None:
        """The answer's body is complete: its last chunk, unless its writer already sent it."""
        if self.opened and not self.cut_off and self.chunked and not self.ended:
            self.ended = True
            self._conn.write(_LAST_CHUNK)

    async def drain(self) -> None:
        await self._conn.drain()

    async def write(self, data: bytes) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        await self._conn.drain()

    def cut(self) -> None:
        self.cut_off = True
        if self._conn.transport is not None:
            self._conn.transport.close()


class ClientConnection(asyncio.Protocol):
    """One client's connection: the hot route's requests are answered here, one at a time."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.writing_paused = False  # read by the pass-through's sink after each write, as aiohttp's is
        self.keep_alive = True
        self._drained: asyncio.Future[None] | None = None
        self._raw = bytearray()  # every byte of the request being read (or read past the one being answered)
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # a head over the limits was answered: what the client still sends is dropped
        self._request_end = 0  # where in ``_raw`` the complete request ends: later bytes are the client's next
        self._paced = False  # complete, waiting for its turn to start (proxy/pacing.py)
        self._reset()

    def _reset(self) -> None:
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._head_done = False
        self._complete = False
        self._hand_over_now = False
        self._method = "POST"  # or GET, as the head said (a head the front does not take is handed over)
        self._ascii_values = True  # every header value is ASCII (llhttp takes only tokens as names)
        self._started = 0.0
        self._refusal: Refusal | None = None  # the head is over a limit, or the body's framing broke

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self.transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH)
        peer = transport.get_extra_info("peername")  # TCP_NODELAY: uvloop and asyncio set it on every TCP socket
        self.remote = peer[0] if isinstance(peer, tuple) else None
        front = self._front
        front.connections.add(self)
        self._arm_timer()
        front.open_engine_connection_ahead()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._raw += data
        if self._task is not None or self._paced:  # the client sent on before its answer ended: read once it has
            if len(self._raw) > BODY_CAP and self.transport is not None:
                self.transport.pause_reading()  # until then, the socket holds the rest
            return
        if not self._started:
            self._started = now()
        assert self._parser is not None  # dropped only once the connection is gone or handed over
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # malformed, an upgrade, or a second request: aiohttp's to answer
            if self._refusal is None and self._in_body and not isinstance(exc, httptools.HttpParserUpgrade):
                # The body's framing broke: aiohttp's parser would drop the request read so far for a bare 400.
                self._refusal = (400, f"the request body could not be read: {exc}", "request_body_unreadable")
            elif self._refusal is None:
                self._hand_over()
                return
        if self._refusal is None and not self._head_done and len(self._raw) > self._front.max_header_bytes:
            self._check_lines()
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._hand_over_now:
            self._hand_over()
        elif self._complete:
            self._request_end = len(self._raw)
            if self._front.pacer.admit(self):
                self._begin()
            else:
                self._paced = True
        elif self._head_done:  # the body has begun: it may pause no longer than the body timeout at a time
            self._arm_timer(self._front.body_timeout, self._on_body_timeout)

    def start_if_still_wanted(self) -> None:
        self._paced = False
        if self._parser is not None and self.transport is not None and not self.transport.is_closing():
            self._begin()

    def connection_lost(self, exc: Exception | None) -> None:
        self._parser = None  # it refers back to this protocol: without the cycle, freeing needs no GC pass
        self._front.connections.discard(self)
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()  # the exchange ends as a client abort, which closes the engine's request
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second request in the same read
            self._hand_over_now = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        limit = self._front.max_header_bytes
        if len(self._url) > limit and self._refusal is None:
            self._refusal = _target_too_long(limit)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if self._refusal is not None:
            return
        front = self._front
        if len(name) + len(value) > front.max_header_bytes:
            self._refusal = _header_too_large(front.max_header_bytes)
        elif len(self._headers) > front.max_headers:
            self._refusal = (431, f"the request has over {front.max_headers} headers", "too_many_request_headers")

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._cancel_timer()
        if not self._takes_head():
            self._hand_over_now = True

    def on_body(self, body: bytes) -> None:
        if not self._hand_over_now:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    # -- the exchange -------------------------------------------------------------------------------------------

    def _takes_head(self) -> bool:
        """Whether the head alone allows this request here: the body's own checks come once it is read."""
        parser = self._parser
        assert parser is not None  # a callback of this very parser
        if parser.get_http_version() != "1.1" or parser.should_upgrade():
            return False
        method = parser.get_method()
        path = bytes(self._url).split(b"?", 1)[0]
        listing = method == b"GET" and path == b"/v1/models"
        if not listing and not (method == b"POST" and (path.startswith(b"/v1/") or path in FORWARDED_PATHS)):
            return False
        self._method = "GET" if listing else "POST"
        declared = -1
        for name, value in self._headers:
            lowered = name.lower()
            if lowered in _HANDED_OVER_HEADERS:
                return False
            if lowered == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif not value.isascii():
                self._ascii_values = False  # whether it is UTF-8 is checked once the request is whole
        if listing:
            return declared in (-1, 0)
        # A body read here whole can be sent again to another engine: no larger than one read ahead for that.
        limit = min(BODY_CAP, outgoing_body.READ_AHEAD_CAP, self._front.guards.max_body_bytes or BODY_CAP)
        return 0 < declared <= limit

    def _begin(self) -> None:
        self._cancel_timer()  # the body's, if it came in several reads
        front = self._front
        guards = front.guards
        body_done = now()
        raw_headers = self._headers
        try:  # bytes that are not UTF-8 in the head: aiohttp's rules decide what becomes of them
            target = self._url.decode()
            if not self._ascii_values:
                for _, value in raw_headers:
                    value.decode()
        except UnicodeDecodeError:
            self._hand_over()
            return
        body = b"".join(self._body)
        if not guards.routes.forwards(target):
            self._hand_over()
            return
        model = named_model(body)  # once: for the alias check here and for the record
        if self._aliased(model, target):
            self._hand_over()
            return
        if guards.keys:
            token = bearer(first_value(raw_headers, b"authorization") or "")
            if token is None or not guards.keys.accepts(token):
                self._hand_over()  # aiohttp's guard answers 401 in the API's own words
                return
            raw_headers = [pair for pair in raw_headers if pair[0].lower() != b"authorization"]  # for the gateway alone
        admission = guards.admission
        if admission is not None:
            if admission.active >= admission.limit:
                self._hand_over()  # aiohttp's guard answers 429
                return
            admission.active += 1
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        request = FrontRequest(self, guards.cors, self._method, target, raw_headers, body)
        started = self._started
        del self._raw[: self._request_end]  # what the client sent on is read once this answer ends (``_after``)
        self._reset()
        front.stats.answered += 1
        serving = self._serve(request, started, body_done, model)
        # A POST goes to the engine from this very callback; the listing asks aiohttp's client, which needs a task.
        task = eager.start(self._loop, serving) if request.method == "POST" else self._loop.create_task(serving)
        if task is None:  # answered without waiting (a refusal, say)
            if admission is not None:
                admission.leave()
            return
        self._task = task
        if admission is not None:
            task.add_done_callback(admission.leave)  # also when the task is cancelled before it starts

    def _aliased(self, model: str | None, target: str) -> bool:
        """A chat completion naming a thinking alias: rewritten by aiohttp's route (proxy/model_aliases.py)."""
        suffixes = self._front.gateway.ollama.alias_suffixes
        return model is not None and target.startswith("/v1/chat/completions") and names_alias(model, suffixes)

    async def _serve(self, request: FrontRequest, started: float, body_done: float, model: str | None) -> None:
        front = self._front
        finished = False
        try:
            if request.method == "GET":  # GET /v1/models, the aliases added as aiohttp's route does
                answer = await list_models(request, front.gateway, front.models)
            else:
                answer = await exchange(request, front.gateway, request.body, started, body_done, model)
            if answer is not None:
                self._reply(answer)
            else:
                request.finish()
            finished = (request.opened and not request.cut_off) or answer is not None
        except asyncio.CancelledError:
            pass  # the client's connection is gone
        except Exception:
            front.gateway.log.exception("front_exchange_failed", path=request.path)
            if not request.opened:
                self._reply(error_response(500, "the gateway failed to forward the request", code="internal_error"))
        finally:
            self._task = None
            self._after(finished)

    def _after(self, finished: bool) -> None:
        """The answer is out: wait for the next request, or hand on what the client already sent."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not finished or not self.keep_alive:
            transport.close()
            return
        self._arm_timer()
        if self._raw:  # the client sent on before its answer ended (it may, once the last chunk is out)
            sent_on = bytes(self._raw)
            self._raw.clear()
            if not transport.is_reading():
                transport.resume_reading()
            self.data_received(sent_on)

    def _reply(self, response: web.Response) -> None:
        body = cast(bytes, response.body or b"")
        headers = CIMultiDict(response.headers)
        self._front.guards.cors.shape_without_origin(headers)
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
        if not self.keep_alive:
            headers[hdrs.CONNECTION] = "close"
        self.write(_head(response.status, response.reason, headers) + body)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        if self.writing_paused:
            self._drained = self._loop.create_future()
            await self._drained
            if transport.is_closing():
                raise ConnectionResetError("the client's connection is closed")

    def _check_lines(self) -> None:
        """llhttp reports a header only once the next one begins: a line read may already be over the limit."""
        limit = self._front.max_header_bytes
        lines = self._raw.split(b"\n")
        if len(lines[0]) > limit + 1:
            self._refusal = _target_too_long(limit)
        elif any(len(line) > limit + 1 for line in lines[1:]):
            self._refusal = _header_too_large(limit)

    @property
    def _in_body(self) -> bool:
        return self._head_done and not self._complete

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer a request refused while it is read, and close as nginx does: our side first, then what still
        arrives is read and dropped until the client closes or the header timeout ends it, so no reset destroys
        the answer."""
        transport = self.transport
        assert transport is not None
        self._refused = True
        self.keep_alive = False
        self._parser = None
        self._raw = bytearray()
        path = bytes(self._url).split(b"?", 1)[0].decode("latin-1")
        self._front.gateway.log.info("refused", status=status, code=code, path=path[:256], remote=self.remote)
        body = refusal_body(path, message, code=code)
        self._reply(web.Response(status=status, body=body, content_type="application/json"))
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        self._arm_timer()

    def _hand_over(self) -> None:
        """From here on this connection is aiohttp's, starting with every byte of the request not answered."""
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self._parser = None
        self._front.connections.discard(self)
        self._front.stats.handed_over += 1
        protocol = self._front.aiohttp_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()
        if self._raw:
            protocol.data_received(bytes(self._raw))
        self._raw = bytearray()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _arm_timer(self, delay: float | None = None, then: Callable[[], None] | None = None) -> None:
        """By default the header timeout: a whole request head must come within it of opening or of the last
        answer (and a refused client must be gone by then)."""
        self._cancel_timer()
        self._timer = self._loop.call_later(delay or self._front.header_timeout, then or self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._task is None:
            self.close()

    def _on_body_timeout(self) -> None:
        self._timer = None
        if self._task is None and self._in_body and not self._refused:
            self._refuse(408, str(outgoing_body.BodyStalled.after(self._front.body_timeout)), "request_body_timeout")


def _target_too_long(limit: int) -> Refusal:
    return (414, f"the request target is over {limit} bytes", "request_target_too_long")


def _header_too_large(limit: int) -> Refusal:
    return (431, f"a request header is over {limit} bytes", "request_header_too_large")


def _status_line(status: int, reason: str) -> bytes:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("utf-8", "surrogateescape")


def _head(status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
    return _status_line(status, reason) + message_head("", headers)
