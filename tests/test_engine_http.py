"""The pass-through's own HTTP/1.1 connections to the engine, against an engine that answers with exact bytes.

An aiohttp test server cannot send a body without length, an interim answer, broken framing or bytes between
answers; a raw socket can, and shows what the gateway sent on which connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import aiohttp
import orjson
import pytest
from aiohttp.http_exceptions import TransferEncodingError
from structlog.testing import capture_logs

from flushgate.config import Config, Timeouts
from flushgate.proxy import passthrough
from flushgate.proxy.client_side import Opened
from flushgate.proxy.engine_http import (
    EngineConnectError,
    EngineConnection,
    EngineConnections,
    EngineIdle,
    EngineStale,
)
from flushgate.server import Server
from flushgate.timings import RequestTimings
from tests.fakes import assert_resent_once_unheld
from tests.turns import turns_until

GUARD_S = 10
Answer = Callable[[asyncio.StreamWriter], "asyncio.Future[None] | None"]


@dataclass
class Seen:
    connection: int
    head: bytes
    body: bytes


@dataclass
class RawEngine:
    """Answers the n-th request with ``answers[n]`` (bytes, written as they are), then keeps or closes the
    connection as the answer's ``close`` says; ``None`` reads what follows until the gateway hangs up."""

    answers: list[tuple[bytes, bool] | None] = field(default_factory=list)
    leftovers: list[bytes] = field(default_factory=list)
    request_seen: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":", 1)[1]))
                self.seen.append(Seen(number, head, body))
                self.request_seen.set()
                planned = self.answers[len(self.seen) - 1]
                if planned is None:
                    self.leftovers.append(await reader.read())
                    return
                answer, close = planned
                writer.write(answer)
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def engine() -> AsyncIterator[RawEngine]:
    raw = RawEngine()
    await raw.start()
    yield raw
    await raw.stop()


@pytest.fixture
async def gateway(engine: RawEngine) -> AsyncIterator[Server]:
    server = Server(Config(upstream=engine.url, port=0, timeouts=Timeouts(connect=5.0, idle=5.0, drain=1.0)))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def gateway_url(gateway: Server) -> str:
    return f"http://127.0.0.1:{gateway.port}"


def answer(status: str, headers: list[str], body: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode() + body


OK = (answer("200 OK", ["Content-Type: application/json", "Content-Length: 11"], b'{"ok":true}'), False)


TWO_BYTE_POST = b"POST /v1/completions HTTP/1.1\r\nHost: e\r\nContent-Length: 2\r\n\r\n"  # its body: b"{}"


async def post(http: aiohttp.ClientSession, url: str, data: bytes = b"{}") -> tuple[int, bytes]:
    async with http.post(url + "/v1/completions", data=data) as resp:
        return resp.status, await asyncio.wait_for(resp.read(), GUARD_S)


async def test_a_body_without_length_or_chunks_is_read_until_the_engine_closes(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [(answer("200 OK", ["Content-Type: application/json"], b'{"whole": "answer"}'), True), OK]
    assert await post(http, gateway_url) == (200, b'{"whole": "answer"}')
    assert await post(http, gateway_url) == (200, b'{"ok":true}')  # on a new connection: that one was closed
    assert [s.connection for s in engine.seen] == [1, 2]


async def test_an_interim_answer_is_passed_over_and_the_final_one_forwarded(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    early = answer("103 Early Hints", ["Link: </style.css>; rel=preload"])
    engine.answers = [(early + OK[0], False)]
    assert await post(http, gateway_url) == (200, b'{"ok":true}')


async def test_a_head_request_does_not_wait_for_the_body_its_length_announces(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [(answer("200 OK", ["Content-Type: application/json", "Content-Length: 11"]), False), OK]
    async with http.head(gateway_url + "/version") as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.read(), GUARD_S) == b""
    assert engine.seen[0].head.startswith(b"HEAD /version HTTP/1.1\r\n")
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    assert [s.connection for s in engine.seen] == [1, 2]  # the HEAD's connection was not trusted again


async def test_an_answer_that_is_not_http_is_a_502_in_openai_shape(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", False)]
    status, body = await post(http, gateway_url)
    assert status == 502
    error = orjson.loads(body)["error"]
    assert error["code"] == "upstream_error"
    assert "not valid HTTP" in error["message"]


async def test_broken_chunk_framing_mid_stream_ends_with_an_error_event(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    event = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    head = answer("200 OK", ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"])
    engine.answers = [(head + b"%x\r\n%b\r\n" % (len(event), event) + b"zz\r\nnot a chunk\r\n", False)]
    status, body = await post(http, gateway_url)
    assert status == 200
    assert body.startswith(event)
    error = orjson.loads(body[len(event) + len(b"data: ") :])["error"]
    assert error["code"] == "upstream_disconnected"
    assert b"[DONE]" not in body


async def test_a_kept_alive_connection_carries_the_next_request_and_one_the_engine_closed_does_not(
    engine: RawEngine, gateway: Server, http: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{gateway.port}"
    engine.answers = [OK, OK, OK]
    assert await post(http, url) == (200, b'{"ok":true}')
    assert await post(http, url) == (200, b'{"ok":true}')
    assert [s.connection for s in engine.seen] == [1, 1]
    assert gateway.gateway is not None
    pool = gateway.gateway.engines
    assert pool.idle_count(engine.url) == 1
    engine.writers[0].close()  # as an engine does with a connection idle past its keep-alive
    await turns_until(lambda: pool.idle_count(engine.url) == 0)  # the gateway's loop sees the close
    assert pool.idle_count(engine.url) == 0
    assert await post(http, url) == (200, b'{"ok":true}')
    assert [s.connection for s in engine.seen] == [1, 1, 2]


CLOSED_UNANSWERED = (b"", True)  # the engine hangs up on the request: its idle close crossed the request's way


async def test_a_kept_alive_connection_the_engine_closes_without_answering_is_sent_again_on_a_new_one(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [OK, CLOSED_UNANSWERED, OK]
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    with capture_logs() as logs:
        assert await post(http, gateway_url, b'{"n": 2}') == (200, b'{"ok":true}')  # one engine: no failover
    assert [(s.connection, s.body) for s in engine.seen] == [(1, b"{}"), (1, b'{"n": 2}'), (2, b'{"n": 2}')]
    await assert_resent_once_unheld(logs, gateway_url, engine.url)


async def test_a_request_is_sent_again_once_and_a_new_connection_closed_unanswered_is_a_502(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [OK, CLOSED_UNANSWERED, CLOSED_UNANSWERED, OK]
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    status, body = await post(http, gateway_url)
    assert status == 502
    assert "closed the connection before the answer" in orjson.loads(body)["error"]["message"]
    assert [s.connection for s in engine.seen] == [1, 1, 2]


async def test_a_kept_alive_connection_closed_after_part_of_an_answer_is_not_sent_again(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [OK, (b"HTTP/1.1 200 OK\r\n", True), OK]  # the engine took the request: it began to answer
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    status, _ = await post(http, gateway_url)
    assert status == 502
    assert [s.connection for s in engine.seen] == [1, 1]


async def test_an_engine_keepalive_of_zero_opens_a_new_connection_for_every_request(
    engine: RawEngine, http: aiohttp.ClientSession
) -> None:
    timeouts = Timeouts(connect=5.0, idle=5.0, drain=1.0, engine_keepalive=0.0)
    server = Server(Config(upstream=engine.url, port=0, timeouts=timeouts))
    await server.start()
    try:
        engine.answers = [OK, OK]
        assert await post(http, f"http://127.0.0.1:{server.port}") == (200, b'{"ok":true}')
        assert await post(http, f"http://127.0.0.1:{server.port}") == (200, b'{"ok":true}')
    finally:
        await server.stop()
    assert [s.connection for s in engine.seen] == [1, 2]


async def test_an_answer_that_says_connection_close_is_not_followed_by_another_request_on_it(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    closing = answer("200 OK", ["Content-Type: application/json", "Content-Length: 2", "Connection: close"], b"{}")
    engine.answers = [(closing, False), OK]  # the engine leaves the socket open; the header alone must count
    assert await post(http, gateway_url) == (200, b"{}")
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    assert [s.connection for s in engine.seen] == [1, 2]


async def test_bytes_from_the_engine_between_answers_retire_the_connection(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [(OK[0] + b"HTTP/1.1 200 OK\r\n", False), OK]
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    assert await post(http, gateway_url) == (200, b'{"ok":true}')
    assert [s.connection for s in engine.seen] == [1, 2]


async def test_the_request_reaches_the_engine_with_host_length_and_no_hop_by_hop_headers(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.answers = [OK, OK]
    await post(http, gateway_url, b'{"model": "m"}')
    async with http.post(gateway_url + "/v1/completions", headers={"Expect": "100-continue"}) as resp:
        assert resp.status == 200
    first, second = engine.seen
    lines = first.head.split(b"\r\n")
    assert lines[0] == b"POST /v1/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{engine.port}".encode() in lines
    assert b"Content-Length: 14" in lines
    assert first.body == b'{"model": "m"}'
    assert b"Content-Length: 0" in second.head.split(b"\r\n")  # a POST without a body still says so
    assert b"expect" not in second.head.lower()  # answered on the client's hop, not asked again


async def test_a_client_body_that_fails_mid_upload_is_a_400_and_the_engine_request_is_dropped(
    engine: RawEngine, gateway_url: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp answers a malformed body itself when it can; this is the case where reading it fails after the
    upload to the engine has begun (a body that broke off, a framing error the parser met late)."""

    async def breaks_off(*_: object) -> AsyncIterator[bytes]:
        yield b"hello"
        await engine.request_seen.wait()
        raise TransferEncodingError("Not enough data to satisfy transfer length header.")

    monkeypatch.setattr(passthrough, "_request_body", breaks_off)
    engine.answers = [None]

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"

    async with http.post(gateway_url + "/v1/completions", data=body()) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "request_body_unreadable"
    assert error["type"] == "invalid_request_error"
    assert b"Transfer-Encoding: chunked" in engine.seen[0].head
    await turns_until(lambda: engine.leftovers)  # the engine sees the connection dropped
    assert engine.leftovers == [b"5\r\nhello\r\n"]  # what was read went on; then the connection was dropped


class _Recorded:
    """The engine connection's transport, keeping what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


async def test_a_head_handler_runs_in_the_read_callback_and_its_sink_gets_the_body_that_came_with_the_head() -> None:
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    conn.connection_made(cast(asyncio.Transport, _Recorded()))
    heads: list[int] = []
    body: list[tuple[bytes, bool]] = []

    def on_head() -> Callable[[bytes, bool], None]:
        heads.append(conn.status)
        return lambda data, ends: body.append((data, ends))

    head = conn.send(b"POST /v1/completions HTTP/1.1\r\n\r\n", None, None, on_head)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
    assert heads == []  # an interim answer is not the answer
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert heads == [200]  # called once, from within the read that brought the head
    assert body == [(b"hello", False)]  # and the body of that read already went to its sink
    assert head.done()
    assert not conn.complete
    conn.data_received(b"1\r\n!\r\n0\r\n\r\n")
    assert body == [(b"hello", False), (b"!", True)]  # the read that ends the answer says so
    assert conn.complete


async def test_a_sink_is_called_for_a_read_with_the_head_alone_and_for_one_with_the_end_alone() -> None:
    """The client's head waits in the sink for a write, and its last chunk for the end: both reads reach it."""
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    conn.connection_made(cast(asyncio.Transport, _Recorded()))
    body: list[tuple[bytes, bool]] = []
    conn.send(b"POST /v1/completions HTTP/1.1\r\n\r\n", None, None, lambda: lambda d, e: body.append((d, e)))
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert body == [(b"", False)]
    conn.data_received(b"2\r\nhi\r\n")
    conn.data_received(b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
    assert body == [(b"", False), (b"hi", False), (b"", True)]  # nothing after the answer's end goes on
    assert not conn.reusable  # and a connection out of step with its requests is not used again


async def test_a_head_handler_that_returns_no_sink_leaves_the_body_for_the_task() -> None:
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    conn.connection_made(cast(asyncio.Transport, _Recorded()))
    head = conn.send(b"POST /v1/completions HTTP/1.1\r\n\r\n", None, None, lambda: None)
    conn.data_received(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    await head
    body: list[tuple[bytes, bool]] = []
    ended = conn.attach(lambda data, ends: body.append((data, ends)))
    assert body == [(b"busy", True)]
    assert await ended


_REQUEST = b"POST /v1/completions HTTP/1.1\r\n\r\n"
_SHORT_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("first_idle_s", [0.02, 60.0])
async def test_an_engine_silent_in_a_later_exchange_on_a_kept_connection_is_cut_off_by_the_idle_check(
    first_idle_s: float,
) -> None:
    """The idle check outlives the exchange that armed it (one timer per connection, not one per request): the
    next exchange is timed by it, or by a new one where it would come due later than that exchange allows."""
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    conn.connection_made(cast(asyncio.Transport, _Recorded()))
    conn.send(_REQUEST, None, first_idle_s)
    conn.data_received(_SHORT_ANSWER)
    assert conn.complete
    head = conn.send(_REQUEST, None, 0.02)  # and the engine sends nothing
    with pytest.raises(EngineIdle):
        await asyncio.wait_for(head, 5.0)


class _Aborted(_Recorded):
    aborted = False

    def abort(self) -> None:
        self.aborted = True


async def test_an_idle_check_that_comes_due_between_exchanges_leaves_the_connection_open() -> None:
    transport = _Aborted()
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    conn.connection_made(cast(asyncio.Transport, transport))
    conn.send(_REQUEST, None, 0.02)
    conn.data_received(_SHORT_ANSWER)
    conn._last_read -= 1.0  # long past its idle time: the check, come due, finds the answer complete
    conn._check_idle()
    assert not transport.aborted
    assert conn.reusable
    assert conn._timer is None  # and does not come again until a request is sent


class _Flow:
    writing_paused = False


def _client_sink(written: _Recorded, ended: list[bool], *, ends: bool = True) -> passthrough.ClientSink:
    conn = EngineConnection("http://engine", EngineConnections(5.0))
    opened = Opened(
        cast(asyncio.Transport, written), _Flow(), True, b"HEAD\r\n\r\n", b"0\r\n\r\n", lambda: ended.append(True)
    )
    return passthrough.ClientSink(opened, conn, RequestTimings(start=0.0), kind="sse", hops=True, keep=False, ends=ends)


async def test_a_short_answer_goes_to_the_client_in_one_write_head_body_and_last_chunk() -> None:
    written, ended = _Recorded(), list[bool]()
    _client_sink(written, ended).write(b"data: x\n\n", True)
    assert written.written == [b"HEAD\r\n\r\n9\r\ndata: x\n\n\r\n0\r\n\r\n"]
    assert ended == [True]  # the client's server is told, so it does not end the answer again


async def test_the_head_goes_with_the_first_body_bytes_and_the_last_chunk_with_the_read_that_ends_the_answer() -> None:
    written, ended = _Recorded(), list[bool]()
    sink = _client_sink(written, ended)
    sink.write(b"", False)  # a read that brought the head alone
    sink.write(b"a\n\n", False)
    sink.write(b"b\n\n", False)
    assert ended == []
    sink.write(b"", True)  # one that brought only the engine's last chunk
    sink.write(b"", True)  # nothing goes twice
    assert written.written == [b"HEAD\r\n\r\n", b"3\r\na\n\n\r\n", b"3\r\nb\n\n\r\n", b"0\r\n\r\n"]
    assert ended == [True]


async def test_a_sink_whose_answer_still_has_more_to_come_leaves_the_last_chunk_to_the_server() -> None:
    """With the SSE timing comment to follow the body, the relay writes it and the server ends the answer."""
    written, ended = _Recorded(), list[bool]()
    _client_sink(written, ended, ends=False).write(b"data: x\n\n", True)
    assert written.written == [b"HEAD\r\n\r\n9\r\ndata: x\n\n\r\n"]
    assert ended == []


async def test_a_request_claims_a_connection_still_being_made_and_goes_out_the_moment_it_is(engine: RawEngine) -> None:
    """No task waits for the connect and then sends: the request is written from the callback that says the
    connection is made, as nginx writes it from the event that says so."""
    engine.answers = [OK]
    pool = EngineConnections(5.0)
    timings = RequestTimings(start=0.0)
    conn = pool.acquire(engine.url, 5.0, timings)
    assert conn.transport is None  # not made yet
    assert timings.connection_reused is False
    left_unsent: list[bool] = []
    made = conn.connection_made

    def noting(transport: asyncio.BaseTransport) -> None:
        made(transport)
        left_unsent.append(conn._unsent is not None)

    conn.connection_made = noting  # type: ignore[method-assign]
    head = conn.send(TWO_BYTE_POST, b"{}", 5.0)
    assert conn._unsent is not None  # held until the connection is made
    await asyncio.wait_for(head, GUARD_S)
    assert conn.status == 200
    assert left_unsent == [False]  # written within connection_made
    assert engine.seen[0].body == b"{}"
    assert timings.connect_end >= timings.connect_start > 0
    pool.close()


async def test_a_connect_that_fails_is_met_where_the_request_waits_for_the_head() -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    pool = EngineConnections(5.0)
    conn = pool.acquire(f"http://127.0.0.1:{port}", 5.0, RequestTimings(start=0.0))
    head = conn.send(TWO_BYTE_POST, b"{}", 5.0)
    with pytest.raises(EngineConnectError):
        await asyncio.wait_for(head, GUARD_S)
    assert pool.idle_count(f"http://127.0.0.1:{port}") == 0


async def test_a_connection_opened_ahead_and_not_claimed_waits_in_the_pool_and_is_taken_from_there(
    engine: RawEngine,
) -> None:
    pool = EngineConnections(5.0)
    pool.open_ahead(engine.url, 5.0, wanted=1)
    pool.open_ahead(engine.url, 5.0, wanted=1)  # one is already on its way
    await turns_until(lambda: pool.idle_count(engine.url))  # the connect's own task finishes it
    assert pool.idle_count(engine.url) == 1
    timings = RequestTimings(start=0.0)
    conn = pool.acquire(engine.url, 5.0, timings)
    assert conn.transport is not None
    assert timings.connection_reused is False  # new to this request, though it did not wait for the connect
    assert timings.connect_end == timings.connect_start > 0
    assert engine.connections == 1
    pool.close()


async def test_a_connection_opened_ahead_that_the_engine_closes_unanswered_after_waiting_idle_is_stale(
    engine: RawEngine,
) -> None:
    engine.answers = [CLOSED_UNANSWERED]
    pool = EngineConnections(5.0)
    pool.open_ahead(engine.url, 5.0, wanted=1)
    await turns_until(lambda: pool.idle_count(engine.url))
    conn = pool.acquire(engine.url, 5.0, RequestTimings(start=0.0))
    with pytest.raises(EngineStale):
        await asyncio.wait_for(conn.send(TWO_BYTE_POST, b"{}", 5.0), GUARD_S)
    pool.close()


async def test_a_connection_given_up_before_it_is_made_is_closed_once_made_and_nothing_is_sent(
    engine: RawEngine,
) -> None:
    engine.answers = [OK]
    pool = EngineConnections(5.0)
    conn = pool.acquire(engine.url, 5.0, RequestTimings(start=0.0))
    head = conn.send(TWO_BYTE_POST, b"{}", 5.0)
    conn.abort()  # the client left before the engine connection was made
    assert head.cancelled()
    await turns_until(lambda: conn.closed)
    assert conn.closed
    assert engine.seen == []
    assert pool.idle_count(engine.url) == 0
