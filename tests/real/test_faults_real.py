"""Abort storms against a real vLLM on the CPU: every generation a client gives up on is stopped in the engine."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from tests.real.conftest import GatewayProcess, engine_gauge

MODEL = "smollm2-135m-instruct"
WAVES = 10
PER_WAVE = 50
GUARD_S = 120


async def engine_counts(session: aiohttp.ClientSession, engine_url: str) -> tuple[float, float]:
    """vLLM's own gauges: requests running and requests waiting."""
    async with session.get(engine_url + "/metrics") as resp:
        text = await resp.text()
    return engine_gauge(text, "vllm:num_requests_running"), engine_gauge(text, "vllm:num_requests_waiting")


async def abort_after(port: int, events: int, request_id: str) -> None:
    """Send a streamed chat request and drop the connection after ``events`` SSE events (0: right after sending)."""
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to one thousand."}],
            "stream": True,
            "max_tokens": 1000,
            "ignore_eos": True,
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    if events:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        seen = b""
        while seen.count(b"data: ") < events:
            chunk = await reader.read(65536)
            assert chunk, "the stream ended before the client left"
            seen += chunk
    writer.transport.abort()  # a reset, as when a browser tab is closed


async def test_500_client_aborts_leave_no_request_running_in_vllm(smol_gateway: GatewayProcess) -> None:
    engine_url = smol_gateway.engine["url"]
    port = int(smol_gateway.url.rsplit(":", 1)[1])
    leave_after = [0, 1, 3]  # right after sending, after the first event, after a few tokens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S)) as session:
        started = time.monotonic()
        for wave in range(WAVES):
            aborts = [
                abort_after(port, leave_after[i % len(leave_after)], f"abort-{wave}-{i}") for i in range(PER_WAVE)
            ]
            await asyncio.wait_for(asyncio.gather(*aborts), GUARD_S)
        last_abort = time.monotonic()
        while (counts := await engine_counts(session, engine_url)) != (0, 0):
            assert time.monotonic() - last_abort < 10, f"vLLM still has (running, waiting) = {counts}"
            await asyncio.sleep(0.05)  # vLLM publishes these only as polled gauges
        settled_s = time.monotonic() - last_abort

        body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        async with session.post(
            smol_gateway.url + "/v1/chat/completions", json={**body, "max_tokens": 16, "temperature": 0}
        ) as resp:
            assert resp.status == 200
            assert "Paris" in (await resp.json())["choices"][0]["message"]["content"]
        async with session.get(smol_gateway.url + "/metrics") as resp:
            assert engine_gauge(await resp.text(), "flushgate_inflight_requests") == 0
    print(
        f"\n{WAVES * PER_WAVE} aborts in {last_abort - started:.1f} s; vLLM had no running or waiting request "
        f"{settled_s:.2f} s after the last"
    )
