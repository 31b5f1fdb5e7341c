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


async def abort_after(port: int, events: int, request_id: str) -> int:
    """Send a streamed chat request and drop the connection after ``events`` SSE events (0: right after sending).

    Returns the status the gateway answered (0 when the client left before the head). A machine too loaded to
    connect to the engine in time gets the gateway's 5xx error in the OpenAI shape; that is checked, not hidden.
    """
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
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        if not events:
            return 0
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            assert status in (503, 504), head
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
            error = orjson.loads(await reader.readexactly(length))["error"]
            assert error["code"], error
            assert error["message"], error
            return status
        seen = b""
        while seen.count(b"data: ") < events:
            chunk = await reader.read(65536)
            assert chunk, "the stream ended before the client left"
            seen += chunk
        return status
    finally:
        writer.transport.abort()  # a reset, as when a browser tab is closed; also when this task is cancelled


async def test_500_client_aborts_leave_no_request_running_in_vllm(smol_gateway: GatewayProcess) -> None:
    engine_url = smol_gateway.engine["url"]
    port = int(smol_gateway.url.rsplit(":", 1)[1])
    leave_after = [0, 1, 3]  # right after sending, after the first event, after a few tokens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S)) as session:
        started = time.monotonic()
        statuses: list[int] = []
        for wave in range(WAVES):
            async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as wave_tasks:  # one failure cancels the rest
                aborts = [
                    wave_tasks.create_task(abort_after(port, leave_after[i % len(leave_after)], f"abort-{wave}-{i}"))
                    for i in range(PER_WAVE)
                ]
            statuses += [task.result() for task in aborts]
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
    refused = len([status for status in statuses if status not in (0, 200)])
    print(
        f"\n{WAVES * PER_WAVE} aborts in {last_abort - started:.1f} s ({refused} answered a 5xx error before "
        f"streaming); vLLM had no running or waiting request {settled_s:.2f} s after the last"
    )
