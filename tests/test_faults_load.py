"""Memory under load, measured on the gateway as its own process (``flushgate serve``) in front of a fake engine.

Each test is bounded in requests and time and talks only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fakes import FakeUpstream, start_stream
from tests.real.conftest import GatewayProcess

GUARD_S = 60
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
async def gateway_process(fake: FakeUpstream) -> AsyncIterator[GatewayProcess]:
    gateway = await asyncio.to_thread(GatewayProcess, "--upstream", fake.url)
    yield gateway
    assert await asyncio.to_thread(gateway.stop) == 0


def pattern_chunk(stream: int, size: int = 64 << 10) -> bytes:
    """One SSE event of ``size`` bytes that names its stream, so a client can check it got its own bytes."""
    head = f"data: {stream:05d} ".encode()
    return head + b"x" * (size - len(head) - 2) + b"\n\n"


async def open_raw_stream(port: int, stream: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client socket with a small fixed receive buffer, so a reader that stops reading stops the flow early."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    writer.write(
        f"POST /v1/chat/completions?stream={stream} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    await writer.drain()
    return reader, writer


async def test_200_stalled_readers_keep_gateway_memory_bounded_because_backpressure_reaches_the_engine(
    fake: FakeUpstream, gateway_process: GatewayProcess
) -> None:
    """Two hundred clients stop reading while the engine has endless output for each.

    Without backpressure the gateway would buffer whatever the engine sends, and the engine would never feel a
    full socket; with it, every engine stream ends up blocked on a full socket and the gateway's memory stays
    flat however much the engine has left to send.
    """
    readers = 200
    sent: Counter[int] = Counter()
    blocked: set[int] = set()
    gone: set[int] = set()
    all_blocked, all_gone = asyncio.Event(), asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        stream = int(request.query["stream"])
        transport = request.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        response = await start_stream(request)
        chunk = pattern_chunk(stream)
        try:
            while True:
                await response.write(chunk)
                sent[stream] += len(chunk)
                if transport.get_write_buffer_size() > 0 and stream not in blocked:  # the socket is full
                    blocked.add(stream)
                    if len(blocked) == readers:
                        all_blocked.set()
        except (asyncio.CancelledError, ConnectionError):
            gone.add(stream)
            if len(gone) == readers:
                all_gone.set()
            raise

    fake.handler = endless
    port = int(gateway_process.url.rsplit(":", 1)[1])
    before = rss_bytes(gateway_process.popen.pid)
    clients = [await open_raw_stream(port, i) for i in range(readers)]
    await asyncio.wait_for(all_blocked.wait(), GUARD_S)
    during = rss_bytes(gateway_process.popen.pid)
    engine_sent = sum(sent.values())

    # The streams flow again once the readers read, each with its own bytes, and memory stays within the bound
    # while more data passes (each round moves 100 MiB through the gateway, and the buffers fill again).
    rounds = []
    for _ in range(4):
        for stream, (reader, _) in enumerate(clients):
            body = await asyncio.wait_for(reader.readexactly(MIB // 2), GUARD_S)
            assert f"data: {stream:05d} ".encode() in body
            assert f"data: {(stream + 1) % readers:05d} ".encode() not in body
        rounds.append(rss_bytes(gateway_process.popen.pid))
    for _, writer in clients:
        writer.close()
    await asyncio.wait_for(all_gone.wait(), GUARD_S)  # and every engine stream is aborted when its reader leaves

    growth = max(during, *rounds) - before
    print(
        f"\n200 stalled readers: gateway RSS {before / MIB:.1f} MiB idle, {during / MIB:.1f} MiB with every engine "
        f"stream blocked (the engine had sent {engine_sent / MIB:.0f} MiB), then "
        f"{', '.join(f'{r / MIB:.1f}' for r in rounds)} MiB as 400 MiB more passed: at most "
        f"{growth / readers / 1024:.0f} KiB per stream"
    )
    # A bounded buffer per stalled stream, whatever the engine has left and however much has passed through.
    assert growth < readers * 3 * MIB


async def test_20k_requests_in_a_row_grow_gateway_memory_by_under_10_percent(
    fake: FakeUpstream, gateway_process: GatewayProcess
) -> None:
    """Streams, plain answers, client aborts and refusals, 20,000 in all after a warm-up of 2,000: anything
    kept per request (records, timings, connections, tasks) would show as growth."""
    events = [f'data: {{"choices": [{{"delta": {{"content": "t{i}"}}}}]}}\n\n'.encode() for i in range(4)]

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        response = await start_stream(request)
        for event in events:
            await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        return response

    fake.handler = answer
    url = gateway_process.url
    outcomes: Counter[str] = Counter()
    kinds = itertools.cycle(["stream"] * 6 + ["models", "abort", "refused", "stream"])

    async def one(session: aiohttp.ClientSession, kind: str) -> None:
        if kind == "models":
            async with session.get(url + "/v1/models") as resp:
                outcomes[f"{kind}:{resp.status}"] += 1
                await resp.read()
        elif kind == "refused":
            async with session.post(url + "/v1/load_lora_adapter", data=b"{}") as resp:
                outcomes[f"{kind}:{resp.status}"] += 1
                await resp.read()
        else:
            async with session.post(url + "/v1/chat/completions", data=b'{"stream": true}') as resp:
                outcomes[f"{kind}:{resp.status}"] += 1
                if kind == "abort":
                    await resp.content.readany()
                    resp.close()
                else:
                    assert (await resp.read()).endswith(b"data: [DONE]\n\n")

    async def run(total: int) -> float:
        started = time.monotonic()
        todo = iter(range(total))
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                for _ in todo:
                    await one(session, next(kinds))

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(32))), 300)
        return time.monotonic() - started

    pid = gateway_process.popen.pid
    await run(2_000)
    baseline = rss_bytes(pid)
    outcomes.clear()
    took = await run(20_000)
    after = rss_bytes(pid)
    growth = (after - baseline) / baseline
    print(
        f"\n20k requests in {took:.1f} s ({20_000 / took:.0f}/s): gateway RSS {baseline / MIB:.1f} -> "
        f"{after / MIB:.1f} MiB ({growth:+.1%}); {dict(outcomes)}"
    )
    assert sum(outcomes.values()) == 20_000
    assert outcomes["stream:200"] == 14_000
    assert outcomes["abort:200"] == outcomes["models:200"] == 2_000
    assert outcomes["refused:403"] == 2_000
    assert growth < 0.10
