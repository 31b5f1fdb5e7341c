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
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from flushgate.config import Timeouts
from flushgate.engine.supervisor import EngineState
from tests.fakes import DONE_EVENT, FakeUpstream, ScriptedEngine, chat_event, start_stream
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
    assert idle_s * 0.8 <= ended_within < idle_s + 5  # the idle clock started at the last event, just before
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


# Engine events the Ollama translation must reject: each ends the NDJSON stream with an {"error": ...} line.
MALFORMED_FOR_OLLAMA = {
    "not JSON": [b"data: {not json\n\n", DONE_EVENT],
    "not UTF-8": [b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n', DONE_EVENT],
    "not an object": [b"data: [1, 2]\n\n", DONE_EVENT],
    "cut inside an event": [b'data: {"choices": [{"delta": {"content": "par'],
}
# Well-formed JSON of the wrong shape: the translation fails after the stream has started; the stream must still
# end with an error line in intact HTTP framing.
WRONG_SHAPE_FOR_OLLAMA = {
    "choices not a list": [b'data: {"choices": "x"}\n\n', DONE_EVENT],
    "a choice not an object": [b'data: {"choices": [1]}\n\n', DONE_EVENT],
    "delta not an object": [b'data: {"choices": [{"delta": "x"}]}\n\n', DONE_EVENT],
    "tool_calls not a list": [b'data: {"choices": [{"delta": {"tool_calls": "x"}}]}\n\n', DONE_EVENT],
}


async def ollama_stream_after(fake: FakeUpstream, gateway_url: str, tail: list[bytes]) -> list[dict[str, object]]:
    """/api/chat's lines when the engine sends one good event and then ``tail``; fails on broken framing."""
    engine = ScriptedEngine()

    async def generation(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for chunk in [chat_event("Hi"), *tail]:
            await response.write(chunk)
        return response

    engine.generation = generation
    fake.handler = engine
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as http, http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 200
        lines = (await asyncio.wait_for(resp.read(), GUARD_S)).splitlines()
    return [orjson.loads(line) for line in lines]


@pytest.mark.parametrize("tail", MALFORMED_FOR_OLLAMA.values(), ids=MALFORMED_FOR_OLLAMA.keys())
async def test_malformed_sse_on_the_ollama_routes_ends_the_stream_with_an_error_line(
    fake: FakeUpstream, gateway_url: str, tail: list[bytes]
) -> None:
    """/api translates, so it must judge: the good part arrives, then one error line, never a "done" line."""
    lines = await ollama_stream_after(fake, gateway_url, tail)
    assert lines[0]["message"] == {"role": "assistant", "content": "Hi"}
    assert list(lines[-1]) == ["error"]
    assert not any(line.get("done") for line in lines)


@pytest.mark.parametrize("tail", WRONG_SHAPE_FOR_OLLAMA.values(), ids=WRONG_SHAPE_FOR_OLLAMA.keys())
async def test_engine_events_of_the_wrong_shape_on_the_ollama_routes_end_the_stream_with_an_error_line(
    fake: FakeUpstream, gateway_url: str, tail: list[bytes]
) -> None:
    lines = await ollama_stream_after(fake, gateway_url, tail)
    assert list(lines[-1]) == ["error"]


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
        held = await open_streams(http, url, 2)  # open for certain when the engine dies, whatever the loop's timing
        engine_pid, _ = pids_of(engine_env)
        os.kill(engine_pid, signal.SIGKILL)
        held_bodies = await asyncio.wait_for(asyncio.gather(*(s.content.read() for s in held)), REQUEST_BOUND_S)
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
    assert [last_error_code(body) for body in held_bodies] == ["upstream_disconnected"] * 2
    assert completed_after_restart >= 100
