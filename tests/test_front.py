"""The hot route's own server protocol (proxy/front.py): what it answers itself, what it hands to aiohttp, and
that a handed-over request is answered exactly as before (every earlier test of the pass-through now runs
through the front wherever a request qualifies)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from flushgate.cli import main
from flushgate.config import Access, Config, Limits, Timeouts
from flushgate.proxy import front
from flushgate.proxy.client_side import CLIENT_WRITE_HIGH, Opened
from flushgate.proxy.engine_http import EngineConnection
from flushgate.server import Server
from tests.fakes import (
    DONE_EVENT,
    FakeModel,
    FakeUpstream,
    ScriptedEngine,
    chat_event,
    held_stream,
    record_and_echo,
    start_stream,
    stream_hello,
)
from tests.raw_http import parse_response
from tests.turns import turns_until

GUARD_S = 10
CHAT = "/v1/chat/completions"
CHUNKED_BODY = b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
BODY = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}'


def stats(server: Server) -> tuple[int, int]:
    assert server.front is not None
    return server.front.stats.answered, server.front.stats.handed_over


def post_bytes(target: str = CHAT, body: bytes = BODY, extra: str = "", version: str = "1.1") -> bytes:
    head = f"POST {target} HTTP/{version}\r\nHost: gw\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer off a kept-alive connection, as sent: its head, then a chunked or Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        raw = head
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), GUARD_S)
            size = int(size_line.strip(), 16)
            raw += size_line + await asyncio.wait_for(reader.readexactly(size + 2), GUARD_S)
            if size == 0:
                return raw
    length = int(lowered.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    return head + await asyncio.wait_for(reader.readexactly(length), GUARD_S)


async def test_plain_posts_on_one_connection_are_answered_by_the_front_byte_for_byte(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    fake.handler = stream_hello
    reader, writer = connection
    expected = b"".join(
        (chat_event("Hel"), chat_event("lo"), chat_event(finish_reason="stop")),
    )
    for _ in range(2):
        writer.write(post_bytes())
        answer = parse_response(await read_answer(reader), "POST")
        assert answer.status == 200
        assert answer.body.startswith(expected)
        assert answer.body.endswith(DONE_EVENT)
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.headers["x-request-id"]
        assert "engine-ttfb" in answer.headers["server-timing"]
    assert stats(gateway) == (2, 0)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    metrics = parse_response(await read_answer(reader)).body.decode()
    assert "flushgate_own_server_requests_total 2.0" in metrics
    assert "flushgate_handed_over_connections_total 1.0" in metrics  # this very request


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("GET", b"GET /v1/completions HTTP/1.1\r\nHost: gw\r\n\r\n"),
        ("health", b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"),
        ("CORS", post_bytes(extra="Origin: http://ui.example\r\n")),
        ("Expect", post_bytes(extra="Expect: 100-continue\r\n")),
        ("HTTP/1.0", post_bytes(version="1.0")),
        ("thinking alias", post_bytes(body=b'{"model": "fake-model:think", "messages": []}')),
        ("route not allowed", post_bytes("/v1/load_lora_adapter")),
        ("no body", b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"),
        ("chunked body", b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n" + CHUNKED_BODY),
        ("malformed", b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: x\r\n\r\n"),
        ("header not UTF-8", post_bytes().replace(b"Host: gw\r\n", b"Host: gw\r\nX-Note: caf\xe9\r\n")),
    ],
)
async def test_what_the_front_does_not_take_goes_to_aiohttp_with_every_byte_read(
    fake: FakeUpstream, gateway: Server, name: str, raw: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(raw[:20])  # in two reads: what the front kept of the first is handed over too
        await writer.drain()
        writer.write(raw[20:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
        if head.startswith(b"HTTP/1.1 100 "):  # the answer to Expect comes first
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
    finally:
        writer.close()
    status = int(head.split(b" ", 2)[1])
    assert status == {"route not allowed": 403, "malformed": 400}.get(name, 200), head
    assert stats(gateway) == (0, 1)


async def test_requests_pipelined_in_one_read_are_all_handed_over_and_answered_in_order(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    reader, writer = connection
    writer.write(post_bytes(body=b'{"n": 1}') + post_bytes(body=b'{"n": 2}'))
    for _ in range(2):
        assert parse_response(await read_answer(reader), "POST").status == 200
    assert [seen.body for seen in fake.seen] == [b'{"n": 1}', b'{"n": 2}']
    assert stats(gateway) == (0, 1)


async def test_a_request_sent_before_the_answer_ends_waits_for_it_then_is_answered_by_the_front_too(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        if (await request.read()) != b'{"n": 1}':
            return await record_and_echo(fake, request)
        response = await start_stream(request)
        await response.write(chat_event("first"))
        await release.wait()
        await response.write(DONE_EVENT)
        return response

    fake.handler = held
    reader, writer = connection
    writer.write(post_bytes(body=b'{"n": 1}'))
    first = await asyncio.wait_for(reader.readuntil(b"first"), GUARD_S)
    writer.write(post_bytes(body=b'{"n": 2}'))
    await writer.drain()
    release.set()
    first += await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), GUARD_S)
    second = parse_response(await read_answer(reader), "POST")
    assert parse_response(first, "POST").body.endswith(DONE_EVENT)
    assert orjson.loads(second.body) == {"ok": True}
    assert stats(gateway) == (2, 0)


async def test_a_header_value_in_utf8_beyond_ascii_is_taken_by_the_front_and_reaches_the_engine_as_sent(
    fake: FakeUpstream, gateway: Server
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(post_bytes().replace(b"Host: gw\r\n", "Host: gw\r\nX-Note: café\r\n".encode()))
        answer = parse_response(await read_answer(reader), "POST")
    finally:
        writer.close()
    assert answer.status == 200
    assert stats(gateway) == (1, 0)
    assert fake.seen[-1].headers["x-note"] == ["café"]


async def test_a_client_that_leaves_mid_stream_aborts_the_engine_request(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    fake.handler = held_stream(asyncio.Event(), chat_event("tick"), b"")  # never released: an endless answer
    reader, writer = connection
    writer.write(post_bytes())
    await asyncio.wait_for(reader.readuntil(b"tick"), GUARD_S)
    writer.transport.abort()
    await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)
    assert gateway.gateway is not None
    await asyncio.wait_for(gateway.gateway.wait_idle(GUARD_S), GUARD_S)
    assert stats(gateway) == (1, 0)


async def test_the_engines_own_cors_headers_are_dropped_and_vary_is_added_where_origins_are_listed(
    fake: FakeUpstream,
) -> None:
    async def with_cors(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"Access-Control-Allow-Origin": "*"})

    fake.handler = with_cors
    server = Server(Config(upstream=fake.url, port=0, access=Access(cors_origins=("http://ui.example",))))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post_bytes())
        answer = parse_response(await read_answer(reader), "POST")
        writer.close()
    finally:
        await server.stop()
    assert answer.status == 200
    assert "access-control-allow-origin" not in answer.headers
    assert answer.headers["vary"] == "Origin"
    assert stats(server) == (1, 0)


async def test_api_keys_a_good_key_is_taken_and_not_passed_on_a_bad_one_gets_aiohttps_401(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    server = Server(Config(upstream=fake.url, port=0, access=Access(api_keys=("sesame",))))
    await server.start()
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    try:
        async with http.post(url, data=BODY, headers={"Authorization": "Bearer sesame"}) as resp:
            assert resp.status == 200
        async with http.post(url, data=BODY, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
    finally:
        await server.stop()
    assert "authorization" not in fake.seen[0].headers
    assert len(fake.seen) == 1
    assert stats(server) == (1, 1)


async def test_the_concurrency_cap_counts_the_fronts_requests_and_frees_them(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    fake.handler = held_stream(release, chat_event("held"), DONE_EVENT)
    server = Server(Config(upstream=fake.url, port=0, limits=Limits(max_concurrent=1)))
    await server.start()
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    try:
        async with http.post(url, data=BODY) as first:
            await asyncio.wait_for(first.content.readuntil(b"held"), GUARD_S)
            async with http.post(url, data=BODY) as second:
                assert second.status == 429
            release.set()
            assert (await first.read()).endswith(DONE_EVENT)
        assert server.front is not None
        admission = server.front.guards.admission
        assert admission is not None
        assert admission.active == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post_bytes())
        assert parse_response(await read_answer(reader), "POST").status == 200
        writer.close()
    finally:
        await server.stop()
    assert stats(server) == (2, 1)


async def test_an_unexpected_failure_is_a_500_in_openai_shape(
    gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(front, "exchange", broken)
    reader, writer = connection
    writer.write(post_bytes())
    answer = parse_response(await read_answer(reader), "POST")
    assert answer.status == 500
    assert orjson.loads(answer.body)["error"]["code"] == "internal_error"
    assert b"a bug" not in answer.body


async def test_stopping_closes_a_kept_alive_connection_of_the_front(fake: FakeUpstream) -> None:
    server = Server(Config(upstream=fake.url, port=0, timeouts=Timeouts(drain=1.0)))
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post_bytes())
    assert parse_response(await read_answer(reader), "POST").status == 200
    await server.stop()
    assert await asyncio.wait_for(reader.read(), GUARD_S) == b""
    writer.close()


async def test_without_the_own_server_aiohttp_answers_everything(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    server = Server(Config(upstream=fake.url, port=0, own_server=False))
    await server.start()
    try:
        async with http.post(f"http://127.0.0.1:{server.port}{CHAT}", data=BODY) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-ID"]
    finally:
        await server.stop()
    assert server.front is None


async def test_a_post_without_a_body_reaches_the_engine_with_one_content_length(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    reader, writer = connection
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    assert parse_response(await read_answer(reader), "POST").status == 200
    assert fake.seen[0].headers["content-length"] == ["0"]  # not the client's beside the gateway's


async def test_a_client_whose_socket_is_full_has_at_most_4_kib_held_for_it_before_the_engine_is_paused(
    gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Not asyncio's 64 KiB: tokens held in the gateway wait behind the ones before them (docs/bench/README.md)."""
    assert gateway.front is not None
    await turns_until(lambda: gateway.front is not None and gateway.front.connections)  # accepted
    (client,) = gateway.front.connections
    assert client.transport is not None
    assert client.transport.get_write_buffer_limits() == (CLIENT_WRITE_HIGH // 4, CLIENT_WRITE_HIGH)
    assert CLIENT_WRITE_HIGH == 4096


async def test_a_client_aiohttp_accepted_itself_gets_the_same_4_kib_mark(fake: FakeUpstream) -> None:
    """``--no-own-server``: aiohttp's server takes the connection, and the mark is set when it answers."""
    server = Server(Config(upstream=fake.url, port=0, own_server=False))
    await server.start()
    release = asyncio.Event()
    fake.handler = held_stream(release, chat_event("first"), DONE_EVENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(post_bytes())
        await asyncio.wait_for(reader.readuntil(b"first"), GUARD_S)  # the answer is open, the engine holds the rest
        assert server._runner is not None
        assert server._runner.server is not None
        (handler,) = server._runner.server.connections
        assert handler.transport is not None
        assert handler.transport.get_write_buffer_limits() == (CLIENT_WRITE_HIGH // 4, CLIENT_WRITE_HIGH)
        release.set()
        await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), GUARD_S)
    finally:
        writer.close()
        await server.stop()


async def test_a_closed_connection_is_freed_without_a_garbage_collection(fake: FakeUpstream, gateway: Server) -> None:
    """Nothing of a finished connection waits for the cycle collector (whose full passes stall every stream), and
    the engine connection it used, back in the pool, keeps nothing of it."""
    assert gateway.front is not None
    gc.collect()
    gc.disable()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(post_bytes())
        assert parse_response(await read_answer(reader), "POST").status == 200
        writer.close()
        await turns_until(lambda: gateway.front is not None and not gateway.front.connections)  # the close seen
        assert not gateway.front.connections
        assert not [o for o in gc.get_objects() if isinstance(o, front.ClientConnection)]
    finally:
        gc.enable()


async def test_listing_the_models_then_chatting_on_the_same_connection_stays_on_the_front(
    fake: FakeUpstream, gateway: Server, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    engine = ScriptedEngine(models=[FakeModel("qwen3", thinking=True), FakeModel("plain")])
    fake.handler = engine
    reader, writer = connection
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    listing = parse_response(await read_answer(reader))
    assert listing.status == 200
    assert [card["id"] for card in orjson.loads(listing.body)["data"]] == [
        "qwen3",
        "plain",
        "qwen3:think",
        "qwen3:nothink",
    ]
    writer.write(
        post_bytes(body=b'{"model": "plain", "messages": [{"role": "user", "content": "hi"}], "stream": true}')
    )
    assert parse_response(await read_answer(reader), "POST").status == 200
    assert [g.body["model"] for g in engine.generations] == ["plain"]
    assert stats(gateway) == (2, 0)


async def test_without_aliases_the_model_list_is_the_engines_own_bytes(fake: FakeUpstream) -> None:
    async def listing(request: web.Request) -> web.Response:
        return web.Response(body=b'{"object": "list", "data": [{"id": "m"}]}', content_type="application/json")

    fake.handler = listing
    server = Server(Config(upstream=fake.url, port=0, thinking_aliases=""))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
        answer = parse_response(await read_answer(reader))
        writer.close()
    finally:
        await server.stop()
    assert answer.body == b'{"object": "list", "data": [{"id": "m"}]}'
    assert "x-request-id" in answer.headers  # through the pass-through
    assert stats(server) == (1, 0)


class CountingEngine(asyncio.Protocol):
    """An engine on a raw socket that counts the connections it is given and answers each request ``ok``."""

    connections: list[CountingEngine]

    def __init__(self, connections: list[CountingEngine], opened: asyncio.Condition) -> None:
        self._connections = connections
        self._opened = opened
        self.received = b""
        self.requests = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._connections.append(self)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._opened:
            self._opened.notify_all()

    def data_received(self, data: bytes) -> None:
        self.received += data
        head, _, body = self.received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        if len(body) >= length and self.transport is not None:
            self.received = b""
            self.requests += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
async def counting_engine() -> AsyncIterator[tuple[str, list[CountingEngine], asyncio.Condition]]:
    connections: list[CountingEngine] = []
    opened = asyncio.Condition()
    server = await asyncio.get_running_loop().create_server(lambda: CountingEngine(connections, opened), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections, opened
    server.close()


async def engine_connections_reach(opened: asyncio.Condition, connections: list[CountingEngine], n: int) -> None:
    async with opened:
        await asyncio.wait_for(opened.wait_for(lambda: len(connections) >= n), GUARD_S)


async def test_a_new_clients_engine_connection_is_opened_before_its_request_arrives_and_then_used(
    counting_engine: tuple[str, list[CountingEngine], asyncio.Condition],
) -> None:
    url, connections, opened = counting_engine
    gateway = Server(Config(upstream=url, port=0))
    await gateway.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        await engine_connections_reach(opened, connections, 1)  # the client has sent nothing yet
        writer.write(post_bytes())
        answer = parse_response(await read_answer(reader), "POST")
        writer.close()
    finally:
        await gateway.stop()
    assert (answer.status, answer.body) == (200, b"ok")
    assert [c.requests for c in connections] == [1]  # the request went on the connection opened ahead


async def test_engine_connections_opened_for_clients_that_sent_nothing_are_kept_and_used_later(
    counting_engine: tuple[str, list[CountingEngine], asyncio.Condition],
) -> None:
    """At most one engine connection per client connection is opened ahead; those nobody claimed wait in the
    pool like any idle connection, and a request takes one of them rather than opening another."""
    url, connections, opened = counting_engine
    gateway = Server(Config(upstream=url, port=0))
    await gateway.start()
    try:
        silent = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(3)]
        await engine_connections_reach(opened, connections, 3)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        await engine_connections_reach(opened, connections, 4)  # a fourth client: a fourth engine connection
        writer.write(post_bytes())
        answer = parse_response(await read_answer(reader), "POST")
        for _, idle in [*silent, (reader, writer)]:
            idle.close()
    finally:
        await gateway.stop()
    assert answer.status == 200
    assert len(connections) == 4  # none was opened for the request itself
    assert sum(c.requests for c in connections) == 1


def test_connections_waiting_to_be_accepted_are_taken_several_to_a_turn_of_the_event_loop() -> None:
    """uvloop's libuv accepts one connection per listening handle and turn of the loop. Under a burst a turn is
    long (every stream's chunks are written in it), so one handle made the last of 256 new clients wait ~140 ms
    to be accepted; the gateway watches its socket with ``--accept-handles`` handles (8)."""
    uvloop = pytest.importorskip("uvloop")

    async def accepted_in_two_turns(handles: int) -> int:
        upstream = FakeUpstream()
        await upstream.start()
        gateway = Server(Config(upstream=upstream.url, port=0, accept_handles=handles))
        await gateway.start()
        clients: list[socket.socket] = []
        try:
            # Blocking connects: the kernel completes each handshake and queues it while the loop runs no turn.
            clients = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(16)]
            await asyncio.sleep(0)  # one turn: the waiting connections are accepted
            await asyncio.sleep(0)  # the next: their protocols are told (connection_made)
            assert gateway.front is not None
            return len(gateway.front.connections)
        finally:
            for client in clients:
                client.close()
            await gateway.stop()
            await upstream.stop()

    assert Config().accept_handles == 8
    assert uvloop.run(accepted_in_two_turns(8)) >= 8
    # One handle: one at a time (a libuv that accepted in a loop would take all 16, and need no more handles).
    assert uvloop.run(accepted_in_two_turns(1)) < 8


def test_accept_handles_are_read_from_the_command_line_and_must_be_at_least_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["serve", "--upstream", "http://127.0.0.1:9", "--accept-handles", "0"]) == 2
    assert "--accept-handles must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("FLUSHGATE_ACCEPT_HANDLES", "0")
    assert main(["serve", "--upstream", "http://127.0.0.1:9"]) == 2
    assert "--accept-handles must be at least 1" in capsys.readouterr().err


async def test_the_answer_opens_in_the_read_of_the_engines_head_and_its_first_bytes_go_with_it(
    fake: FakeUpstream,
    gateway: Server,
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's answer is opened from the engine connection's read callback, not a turn of the event loop
    later when the relaying task runs (a long turn under a burst of new requests)."""
    opened_in: list[str] = []
    open_now = front.FrontRequest.open_now

    def noting(self: front.FrontRequest, *args: Any) -> Opened:
        opened_in.extend(f.function for f in inspect.stack()[1:4])
        return open_now(self, *args)

    monkeypatch.setattr(front.FrontRequest, "open_now", noting)
    release = asyncio.Event()
    fake.handler = held_stream(release, chat_event("first"), DONE_EVENT)
    reader, writer = connection
    writer.write(post_bytes())
    await asyncio.wait_for(reader.readuntil(b"first"), GUARD_S)  # the engine still holds the rest
    release.set()
    await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), GUARD_S)
    assert "on_headers_complete" in opened_in  # llhttp's callback for the head, inside the engine's read
    assert stats(gateway) == (1, 0)


async def test_a_request_is_sent_to_the_engine_from_the_read_that_completed_it(
    fake: FakeUpstream,
    gateway: Server,
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a turn of the event loop later, when a task would first run: under a burst of streams a long turn."""
    sent_from: list[str] = []
    send = EngineConnection.send

    def noting(self: EngineConnection, *args: Any) -> asyncio.Future[None]:
        sent_from.extend(f.function for f in inspect.stack()[1:8])
        return send(self, *args)

    monkeypatch.setattr(EngineConnection, "send", noting)
    fake.handler = stream_hello
    reader, writer = connection
    writer.write(post_bytes())  # the first may wait for the engine connection opened when the client connected
    assert parse_response(await read_answer(reader), "POST").status == 200
    sent_from.clear()
    writer.write(post_bytes())  # the second finds it idle in the pool
    assert parse_response(await read_answer(reader), "POST").status == 200
    assert "_begin" in sent_from  # the front's own step once a request is read, inside the client's read
    assert "data_received" in sent_from
    assert stats(gateway) == (2, 0)
