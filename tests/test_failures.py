"""Failures are never silent: a clear error in the API's shape, or a stream that visibly ends in an error."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from flushgate.config import Config, Timeouts
from flushgate.server import Server
from tests.fakes import FakeUpstream, Handler, held_stream, sse_chunk, start_stream

GUARD_S = 10


@pytest.fixture
def closed_port() -> int:
    """A port on loopback that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A listener whose accept queue is full, so a further connect is never answered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # more than the queue holds; the extra ones stay in SYN_SENT
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in [*fillers, listener]:
        s.close()


async def start_gateway(upstream: str, **timeouts: float) -> Server:
    server = Server(Config(upstream=upstream, port=0, timeouts=Timeouts(**timeouts)))
    await server.start()
    return server


async def test_refused_upstream_is_a_502_naming_it(closed_port: int, http: aiohttp.ClientSession) -> None:
    upstream = f"http://127.0.0.1:{closed_port}"
    server = await start_gateway(upstream)
    try:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 502
            body = await resp.json()
    finally:
        await server.stop()
    assert body["error"]["code"] == "upstream_unreachable"
    assert upstream in body["error"]["message"]


async def test_connect_timeout_is_a_504(unaccepting_port: int, http: aiohttp.ClientSession) -> None:
    server = await start_gateway(f"http://127.0.0.1:{unaccepting_port}", connect=0.3)
    try:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 504
            body = await resp.json()
    finally:
        await server.stop()
    assert body["error"]["code"] == "upstream_connect_timeout"


def dies_after(chunks: list[bytes], content_type: str = "text/event-stream") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request, content_type)
        for chunk in chunks:
            await response.write(chunk)
        assert request.transport is not None
        request.transport.abort()  # the engine process died
        return response

    return handler


async def test_upstream_death_mid_sse_ends_with_an_error_event(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    sent = [sse_chunk("Hello"), sse_chunk(" world")]
    fake.handler = dies_after(sent)
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}") as resp:
        body = await asyncio.wait_for(resp.read(), GUARD_S)
    assert body.startswith(b"".join(sent))
    last = body[len(b"".join(sent)) :]
    assert last.startswith(b"data: ")
    assert last.endswith(b"\n\n")
    error = orjson.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == "upstream_disconnected"
    assert b"[DONE]" not in body


async def test_upstream_death_mid_ndjson_ends_with_an_error_line(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    sent = [b'{"message": {"content": "Hi"}, "done": false}\n']
    fake.handler = dies_after(sent, "application/x-ndjson")
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}") as resp:
        lines = (await asyncio.wait_for(resp.read(), GUARD_S)).splitlines()
    assert lines[0] == sent[0].strip()
    assert orjson.loads(lines[-1])["error"]["code"] == "upstream_disconnected"


async def test_upstream_death_mid_json_body_is_a_visible_truncation(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    fake.handler = dies_after([b'{"choices": [{"text": "partial'], "application/json")
    async with http.post(gateway_url + "/v1/completions", data=b"{}") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), GUARD_S)


async def test_a_stalled_stream_is_ended_by_the_idle_timeout(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:

    async def stall(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("one"))
        await asyncio.Event().wait()  # never sends again
        return response

    fake.handler = stall
    server = await start_gateway(fake.url, idle=0.3)
    try:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            body = await asyncio.wait_for(resp.read(), GUARD_S)
    finally:
        await server.stop()
    first, error_event = body.split(b"\n\n", 1)
    assert first + b"\n\n" == sse_chunk("one")
    assert orjson.loads(error_event.removeprefix(b"data: "))["error"]["code"] == "idle_timeout"
    # the upstream request was closed too, so the engine stops generating
    await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)


async def test_client_disconnect_mid_stream_closes_the_upstream_request(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    fake.handler = held_stream(asyncio.Event(), sse_chunk("first"), b"")  # never released: an endless answer
    resp = await http.post(gateway_url + "/v1/chat/completions", data=b"{}")
    assert await resp.content.readany() == sse_chunk("first")
    resp.close()  # the user closed the tab
    await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)


async def test_client_disconnect_before_a_non_streamed_answer_closes_the_upstream_request(
    fake: FakeUpstream, gateway_url: str
) -> None:
    async def slow_answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.Event().wait()  # "generating"
        return web.Response(text="never")

    fake.handler = slow_answer
    port = int(gateway_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    await writer.drain()
    await asyncio.wait_for(fake.requests_started.wait(), GUARD_S)
    writer.close()
    await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)
    assert await reader.read() == b""


async def test_official_openai_client_raises_on_a_broken_stream(fake: FakeUpstream, gateway_url: str) -> None:
    import openai

    fake.handler = dies_after([sse_chunk("Hello")])
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0)
    received: list[str | None] = []

    async def consume() -> None:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)

    try:
        with pytest.raises(openai.APIError):
            await consume()
    finally:
        await client.close()
    assert received == ["Hello"]


async def test_upstream_death_in_the_middle_of_an_event_still_ends_with_a_whole_error_event(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    fake.handler = dies_after([sse_chunk("Hello"), b'data: {"choices": [{"delta": {"content": "par'])
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}") as resp:
        body = await asyncio.wait_for(resp.read(), GUARD_S)
    events = body.split(b"\n\n")
    assert events[-1] == b""  # the stream ends on an event boundary
    assert events[1] == b'data: {"choices": [{"delta": {"content": "par'  # the cut event, closed as it was
    assert orjson.loads(events[2].removeprefix(b"data: "))["error"]["code"] == "upstream_disconnected"


async def test_a_chunked_body_over_the_limit_is_refused_with_413(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    from flushgate.config import Limits

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 200  # no Content-Length: only counting the bytes can catch it

    server = Server(Config(upstream=fake.url, port=0, limits=Limits(max_body_bytes=1000)))
    await server.start()
    try:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/completions", data=upload()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"
    finally:
        await server.stop()
