"""Engine faults: every request ends, within a bounded time, with its answer or an error the client can see."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from structlog.testing import capture_logs

from flushgate.config import Timeouts
from flushgate.engine.supervisor import EngineState
from tests.fakes import FakeUpstream, start_stream
from tests.managed import managed_server, pids_of, supervisor_of, wait

GUARD_S = 30
REQUEST_BOUND_S = 10.0  # no request may take longer than this to end, whatever the engine does
DONE = b"data: [DONE]\n\n"


def last_error_code(body: bytes) -> str | None:
    """The ``code`` of a stream's final ``data: {"error": ...}`` event, if it ends with one."""
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if not last.startswith(b"data: {"):
        return None
    error = orjson.loads(last.removeprefix(b"data: ")).get("error")
    return error.get("code") if isinstance(error, dict) else None


async def open_streams(http: aiohttp.ClientSession, url: str, count: int) -> list[aiohttp.ClientResponse]:
    """``count`` endless streams from the stand-in vLLM, each with its first event already read."""
    streams = [await http.post(url + "/v1/chat/completions", json={"fake_token_gap_s": 0.01}) for _ in range(count)]
    for stream in streams:
        assert stream.status == 200
        assert (await asyncio.wait_for(stream.content.readany(), GUARD_S)).startswith(b"data: ")
    return streams


async def test_an_engine_killed_mid_stream_ends_every_open_stream_with_the_error_event(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    server = await managed_server(tmp_path)
    sup = supervisor_of(server)
    url = f"http://127.0.0.1:{server.port}"
    try:
        await asyncio.wait_for(sup.wait_ready(), GUARD_S)
        streams = await open_streams(http, url, 20)
        engine_pid, _ = pids_of(engine_env)
        os.kill(engine_pid, signal.SIGKILL)
        started = time.monotonic()
        bodies = await asyncio.wait_for(asyncio.gather(*(s.content.read() for s in streams)), REQUEST_BOUND_S)
        ended_within = time.monotonic() - started
        await wait(sup, lambda s: s.state is EngineState.READY and s.restarts == 1)
        async with http.post(url + "/v1/chat/completions", json={"fake_tokens": 3}) as resp:
            assert (await resp.read()).endswith(DONE)
    finally:
        await server.stop()
    assert [last_error_code(body) for body in bodies] == ["upstream_disconnected"] * 20
    assert not any(DONE in body for body in bodies)
    assert ended_within < REQUEST_BOUND_S


async def test_a_stalled_engine_is_cut_off_by_the_idle_timeout_and_the_gateway_keeps_serving(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    """SIGSTOP freezes the stand-in vLLM: its sockets stay open, nothing more arrives."""
    idle_s = 0.5
    server = await managed_server(tmp_path, timeouts=Timeouts(idle=idle_s, drain=5))
    sup = supervisor_of(server)
    url = f"http://127.0.0.1:{server.port}"
    engine_pid = 0
    try:
        await asyncio.wait_for(sup.wait_ready(), GUARD_S)
        streams = await open_streams(http, url, 10)
        engine_pid, _ = pids_of(engine_env)
        os.kill(engine_pid, signal.SIGSTOP)
        started = time.monotonic()
        bodies = await asyncio.wait_for(asyncio.gather(*(s.content.read() for s in streams)), REQUEST_BOUND_S)
        ended_within = time.monotonic() - started
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
        os.kill(engine_pid, signal.SIGCONT)
        async with http.post(url + "/v1/chat/completions", json={"fake_tokens": 3}) as resp:
            assert (await asyncio.wait_for(resp.read(), GUARD_S)).endswith(DONE)
    finally:
        if engine_pid:
            os.kill(engine_pid, signal.SIGCONT)
        await server.stop()
    assert [last_error_code(body) for body in bodies] == ["idle_timeout"] * 10
    assert idle_s <= ended_within < idle_s + 5
    assert sup.restarts == 0  # a stall is not a crash; the engine was left alone


MALFORMED_SSE = [
    b"data: {not json\n\n",
    b"data: \xff\xfe not utf-8 \xc3\x28\n\n",
    b"a line with no field name\n\n",
    b"data: an event split",
    b" across two reads\n\n",
    b"\r\ndata: crlf endings\r\n\r\n",
    b"data: lone carriage returns\r\r",
    b"\x00\x01\x02 binary\n",
    b"event: \n: comment\nid\nretry: soon\n\n",
    b"data: " + b"x" * (256 << 10),  # a quarter-megabyte line with no end
    b"\n\ndata: [DONE]",  # the end marker without its blank line
]


async def test_malformed_sse_from_the_engine_reaches_the_client_byte_for_byte(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    """The /v1 routes are a pass-through: the gateway never judges, repairs or adds to what the engine sent.

    A stream the engine ends normally ends normally, however malformed; only a stream the engine breaks off
    gets the gateway's error event.
    """

    async def malformed(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request, "text/event-stream; charset=utf-8")
        for chunk in MALFORMED_SSE:
            await response.write(chunk)
        return response

    fake.handler = malformed
    with capture_logs() as logs:
        async with http.post(gateway_url + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            body = await asyncio.wait_for(resp.read(), GUARD_S)
    assert body == b"".join(MALFORMED_SSE)
    (record,) = [entry for entry in logs if entry["event"] == "request"]
    assert record["outcome"] == "completed"


async def until(event: asyncio.Event, workers: list[asyncio.Task[None]]) -> None:
    """Wait for ``event``, but fail at once with a worker's own error if one fails first."""
    waiter = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait([waiter, *workers], timeout=GUARD_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in done:
        if task is not waiter:
            task.result()
            raise AssertionError("a client stopped early")
    assert waiter in done, f"not set within {GUARD_S} s"


async def test_an_engine_restart_under_load_leaves_no_request_hanging(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    """Sixteen clients stream without pause while the engine is killed; every request must end in time with
    the full answer, an error event, or a 5xx with a clear code, and answers must be complete again after."""
    server = await managed_server(tmp_path)
    sup = supervisor_of(server)
    url = f"http://127.0.0.1:{server.port}"
    outcomes: Counter[str] = Counter()
    flowing, recovered, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    completed_after_restart = 0
    plan = {"fake_tokens": 20, "fake_token_gap_s": 0.005}

    async def one_request() -> str:
        async with http.post(url + "/v1/chat/completions", json=plan) as resp:
            body = await resp.read()
            if resp.status == 200:
                if body.endswith(DONE) and body.count(b"data: ") == 22:  # role, 20 tokens, [DONE]
                    return "complete"
                return f"cut:{last_error_code(body)}"
            assert resp.status != 503 or "Retry-After" in resp.headers
            return f"{resp.status}:{orjson.loads(body)['error']['code']}"

    async def client() -> None:
        nonlocal completed_after_restart
        while not stop.is_set():
            started = time.monotonic()
            outcome = await asyncio.wait_for(one_request(), REQUEST_BOUND_S)
            assert time.monotonic() - started < REQUEST_BOUND_S
            outcomes[outcome] += 1
            if outcomes["complete"] >= 100:
                flowing.set()
            if outcome == "complete" and sup.restarts == 1:
                completed_after_restart += 1
                if completed_after_restart >= 100:
                    recovered.set()

    try:
        await asyncio.wait_for(sup.wait_ready(), GUARD_S)
        clients = [asyncio.create_task(client()) for _ in range(16)]
        await until(flowing, clients)
        engine_pid, _ = pids_of(engine_env)
        os.kill(engine_pid, signal.SIGKILL)
        await until(recovered, clients)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), GUARD_S)
    finally:
        stop.set()
        await server.stop()
    allowed = {
        "complete",
        "cut:upstream_disconnected",
        "503:engine_restarting",
        "503:engine_loading",
        "502:upstream_unreachable",
        "502:upstream_error",
    }
    assert set(outcomes) <= allowed, outcomes
    assert outcomes["cut:upstream_disconnected"] >= 1, outcomes  # streams were open when the engine died
    assert completed_after_restart >= 100
