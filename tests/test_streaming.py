"""The streaming rules: bytes identical, nothing held back, nothing compressed, no hidden connection cap."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from flushgate.server import Server
from tests.fakes import FakeUpstream, sse_chunk, start_stream

DEADLOCK_GUARD_S = 10  # only fires if the property under test is broken


async def read_exactly(content: aiohttp.StreamReader, size: int) -> bytes:
    got = b""
    while len(got) < size:
        part = await content.readany()
        assert part, f"stream ended after {len(got)} of {size} bytes"
        got += part
    return got


async def test_each_chunk_reaches_the_client_before_the_next_is_sent(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    chunks = [sse_chunk(f"token {i} ") for i in range(25)]
    acks: asyncio.Queue[int] = asyncio.Queue()

    async def lockstep(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for k, chunk in enumerate(chunks):
            await response.write(chunk)
            assert await acks.get() == k  # chunk k+1 only once the client holds chunk k
        return response

    fake.handler = lockstep
    async with http.post(gateway_url + "/v1/chat/completions", json={"stream": True}) as resp:
        assert resp.status == 200
        for k, chunk in enumerate(chunks):
            got = await asyncio.wait_for(read_exactly(resp.content, len(chunk)), DEADLOCK_GUARD_S)
            assert got == chunk
            acks.put_nowait(k)
        assert await resp.content.read() == b""


async def test_request_body_streams_upstream_chunk_by_chunk(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    parts = [f"part-{i}|".encode() for i in range(10)]
    acks: asyncio.Queue[int] = asyncio.Queue()

    async def upload() -> AsyncIterator[bytes]:
        for k, part in enumerate(parts):
            yield part
            assert await asyncio.wait_for(acks.get(), DEADLOCK_GUARD_S) == k

    async def consume(request: web.Request) -> web.Response:
        for k, part in enumerate(parts):
            assert await read_exactly(request.content, len(part)) == part
            acks.put_nowait(k)
        assert await request.content.read() == b""
        return web.Response(text="got it")

    fake.handler = consume
    async with http.post(gateway_url + "/v1/completions", data=upload()) as resp:
        assert resp.status == 200
        assert await resp.text() == "got it"


async def test_event_streams_are_never_compressed_and_tell_later_hops_not_to_buffer(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    body = b"".join(sse_chunk("x" * 200) for _ in range(50))

    async def stream(request: web.Request) -> web.StreamResponse:
        seen_encoding.append(request.headers.get("Accept-Encoding"))
        response = await start_stream(request)
        await response.write(body)
        return response

    seen_encoding: list[str | None] = []
    fake.handler = stream
    headers = {"Accept-Encoding": "gzip, deflate, br"}
    async with http.post(gateway_url + "/v1/chat/completions", headers=headers) as resp:
        assert await resp.read() == body
        assert "Content-Encoding" not in resp.headers
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["Content-Type"] == "text/event-stream"
    assert seen_encoding == ["identity"]


async def test_150_concurrent_streams_are_all_open_upstream_at_once(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    # aiohttp's default connector would hold the 101st stream until one of the first 100 finished.
    streams = 150
    everyone_in = asyncio.Event()
    arrived = 0

    async def barrier(request: web.Request) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == streams:
            everyone_in.set()
        response = await start_stream(request)
        await everyone_in.wait()
        await response.write(sse_chunk("done"))
        return response

    async def one() -> bytes:
        async with http.post(gateway_url + "/v1/chat/completions") as resp:
            return await resp.read()

    fake.handler = barrier
    results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(streams))), DEADLOCK_GUARD_S * 3)
    assert results == [sse_chunk("done")] * streams


def _sockets_on(port: int) -> list[socket.socket]:
    """The live sockets in this process with ``port`` at either end."""
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): it reads no ``__class__``, which some libraries' module objects warn on
        if issubclass(type(obj), asyncio.Transport) and not obj.is_closing():
            sock = obj.get_extra_info("socket")
            if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ends = (obj.get_extra_info("sockname"), obj.get_extra_info("peername"))
            if any(end and end[1] == port for end in ends):
                found.append(sock)
    return found


async def test_tcp_nodelay_is_set_on_client_and_upstream_sockets(
    fake: FakeUpstream, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("first"))
        holding.set()
        await release.wait()
        return response

    fake.handler = hold
    async with http.post(gateway_url + "/v1/chat/completions") as resp:
        await resp.content.readany()
        await holding.wait()
        # Gateway's accepted socket (local port = gateway port) and its socket to upstream (peer = fake port).
        gateway_side = [s for s in _sockets_on(gateway.port) if s.getsockname()[1] == gateway.port]
        upstream_side = [s for s in _sockets_on(fake.port) if s.getpeername()[1] == fake.port]
        assert gateway_side, "no accepted client socket found"
        assert upstream_side, "no upstream socket found"
        for sock in gateway_side + upstream_side:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        release.set()
        await resp.read()
