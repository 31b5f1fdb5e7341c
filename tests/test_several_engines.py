"""Several engines behind one gateway: load spread, affinity, failover before the first byte, health."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from flushgate.config import Config, Routing
from flushgate.server import Server
from tests.fakes import start_stream
from tests.several_engines import (
    GUARD_S,
    EngineFarm,
    answer_event,
    records,
    start_farm,
    start_gateway,
    stop_farm,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"  # forwarded as it streams in (chat bodies are read first, for model aliases)


@pytest.fixture
async def farm() -> AsyncIterator[EngineFarm]:
    farm = await start_farm(3)
    yield farm
    await stop_farm(farm)


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def chat_body(first_user: str, turns: int = 1) -> bytes:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": first_user}]
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"more {turn}"}]
    return orjson.dumps({"model": "m", "messages": messages, "stream": True})


async def post(http: aiohttp.ClientSession, server: Server, body: bytes, path: str = CHAT) -> tuple[int, bytes]:
    async with http.post(f"http://127.0.0.1:{server.port}{path}", data=body) as resp:
        return resp.status, await resp.read()


async def metric(http: aiohttp.ClientSession, server: Server, name: str, **labels: str) -> float | None:
    async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def held_open(release: asyncio.Event) -> object:
    async def behaviour(request: web.Request, engine: int) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(answer_event(engine))
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    return behaviour


def answers_status(status: int) -> object:
    async def behaviour(request: web.Request, engine: int) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"engine {engine} says {status}"}}, status=status)

    return behaviour


async def hangs_up(request: web.Request, engine: int) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()  # the engine process died after reading the request, before answering
    raise asyncio.CancelledError


async def dies_after_first_chunk(request: web.Request, engine: int) -> web.StreamResponse:
    response = await start_stream(request)
    await response.write(answer_event(engine))
    assert request.transport is not None
    request.transport.close()
    return response


async def test_each_stream_goes_to_the_engine_with_the_fewest_open_streams(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    farm.script = [held_open(release)] * 3  # type: ignore[list-item]
    server = await start_gateway(farm.urls)
    try:
        streams = []
        for i in range(3):
            resp = await http.post(f"http://127.0.0.1:{server.port}{CHAT}", data=chat_body(f"q{i}"))
            await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD_S)  # open on its engine now
            streams.append(resp)
        assert sorted(engine for engine, _ in farm.arrivals) == [0, 1, 2]
        assert await metric(http, server, "flushgate_engine_outstanding_requests", engine=farm.urls[0]) == 1
        release.set()
        for resp in streams:
            assert (await asyncio.wait_for(resp.read(), GUARD_S)).endswith(b"data: [DONE]\n\n")
            resp.release()
    finally:
        await server.stop()


async def test_the_record_and_metrics_name_the_engine_that_served(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    server = await start_gateway(farm.urls)
    try:
        with capture_logs() as logs:
            for i in range(6):
                status, _ = await post(http, server, chat_body(f"q{i}"))
                assert status == 200
        served = [record["engine"] for record in records(logs)]
        assert [farm.engine_of(url) for url in served] == [engine for engine, _ in farm.arrivals]
        for index, url in enumerate(farm.urls):
            count = await metric(http, server, "flushgate_engine_requests_total", engine=url, outcome="completed")
            assert count == farm.served_by(index) == 2
            assert await metric(http, server, "flushgate_engine_in_rotation", engine=url) == 1
    finally:
        await server.stop()


async def test_a_refused_engine_is_ejected_and_its_request_served_by_another(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    gone = closed_url()
    server = await start_gateway([gone, farm.urls[0]])
    try:
        with capture_logs() as logs:
            for i in range(4):
                status, body = await post(http, server, chat_body(f"q{i}"))
                assert (status, body) == (200, answer_event(0) + b"data: [DONE]\n\n")
        failed_over = [record for record in records(logs) if "failover" in record]
        assert len(failed_over) == 1  # after the first refusal the engine is out of rotation
        (attempt,) = failed_over[0]["failover"]
        assert attempt["engine"] == gone
        assert "Connect" in attempt["error"]
        assert failed_over[0]["engine"] == farm.urls[0]
        assert farm.served_by(0) == 4
        assert await metric(http, server, "flushgate_engine_in_rotation", engine=gone) == 0
        assert await metric(http, server, "flushgate_engine_ejections_total", engine=gone) == 1
        assert await metric(http, server, "flushgate_engine_failovers_total", engine=gone) == 1
    finally:
        await server.stop()


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_gateway_error_from_one_engine_is_retried_on_another_with_the_same_body(
    farm: EngineFarm, http: aiohttp.ClientSession, status: int
) -> None:
    farm.script = [answers_status(status)]  # type: ignore[list-item]
    server = await start_gateway(farm.urls[:2])
    body = chat_body("x" * 5000)
    try:
        got_status, got = await post(http, server, body)
    finally:
        await server.stop()
    (first, sent_first), (second, sent_second) = farm.arrivals
    assert first != second
    assert sent_first == sent_second == body
    assert (got_status, got) == (200, answer_event(second) + b"data: [DONE]\n\n")


async def test_an_engine_that_hangs_up_before_answering_is_retried_on_another(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    farm.script = [hangs_up]
    server = await start_gateway(farm.urls[:2])
    try:
        with capture_logs() as logs:
            status, got = await post(http, server, chat_body("hello"))
    finally:
        await server.stop()
    (first, _), (second, _) = farm.arrivals
    assert (status, got) == (200, answer_event(second) + b"data: [DONE]\n\n")
    (record,) = records(logs)
    assert record["failover"][0]["engine"] == farm.urls[first]
    assert "EngineBroken" in record["failover"][0]["error"]  # it hung up before any answer came


async def test_once_bytes_went_out_an_engine_failure_ends_the_stream_with_an_error_event_and_no_retry(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    farm.script = [dies_after_first_chunk]
    server = await start_gateway(farm.urls)
    try:
        status, got = await post(http, server, chat_body("hello"))
    finally:
        await server.stop()
    ((engine, _),) = farm.arrivals  # no second engine was asked
    assert status == 200
    first, terminal = got.split(b"\n\n", 1)
    assert first + b"\n\n" == answer_event(engine)
    error = orjson.loads(terminal.removeprefix(b"data: ").strip())["error"]
    assert error["code"] == "upstream_disconnected"
    assert farm.urls[engine] in error["message"]


async def test_when_every_engine_refuses_the_client_gets_a_502_naming_the_last_one(
    http: aiohttp.ClientSession,
) -> None:
    gone = [closed_url(), closed_url()]
    server = await start_gateway(gone)
    try:
        with capture_logs() as logs:
            status, got = await post(http, server, chat_body("hello"))
    finally:
        await server.stop()
    error = orjson.loads(got)["error"]
    (record,) = records(logs)
    assert status == 502
    assert error["code"] == "upstream_unreachable"
    assert record["engine"] in error["message"]
    assert [attempt["engine"] for attempt in record["failover"]] == [u for u in gone if u != record["engine"]]


async def test_retries_stop_after_the_configured_number_and_the_engines_answer_passes_through(
    http: aiohttp.ClientSession,
) -> None:
    farm = await start_farm(4)
    farm.script = [answers_status(503)] * 4  # type: ignore[list-item]
    server = await start_gateway(farm.urls, retries=1)
    try:
        status, got = await post(http, server, chat_body("hello"))
    finally:
        await server.stop()
        await stop_farm(farm)
    assert len(farm.arrivals) == 2
    second = farm.arrivals[1][0]
    assert status == 503
    assert orjson.loads(got) == {"error": {"message": f"engine {second} says 503"}}


async def test_a_body_larger_than_the_read_ahead_is_retried_only_if_it_was_never_sent(
    farm: EngineFarm, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flushgate.proxy.body.READ_AHEAD_CAP", 1024)
    body = chat_body("y" * 100_000)
    farm.script = [answers_status(503)]  # type: ignore[list-item]
    server = await start_gateway(farm.urls[:1])
    refusing = await start_gateway([closed_url(), farm.urls[1]])
    try:
        status, _ = await post(http, server, body, COMPLETIONS)  # one engine: nothing to retry on anyway
        assert status == 503
        with capture_logs() as logs:
            for _ in range(2):  # one of the two goes to the refusing engine first
                status, got = await post(http, refusing, body, COMPLETIONS)
                assert (status, got) == (200, answer_event(1) + b"data: [DONE]\n\n")
        assert sum("failover" in record for record in records(logs)) == 1
        assert [sent for engine, sent in farm.arrivals if engine == 1] == [body, body]
    finally:
        await server.stop()
        await refusing.stop()


async def test_a_sent_body_larger_than_the_read_ahead_is_not_replayed(
    farm: EngineFarm, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flushgate.proxy.body.READ_AHEAD_CAP", 1024)
    farm.script = [answers_status(503)]  # type: ignore[list-item]
    server = await start_gateway(farm.urls[:2])
    try:
        status, got = await post(http, server, chat_body("y" * 100_000), COMPLETIONS)
    finally:
        await server.stop()
    ((engine, _),) = farm.arrivals
    assert status == 503
    assert orjson.loads(got) == {"error": {"message": f"engine {engine} says 503"}}


async def test_a_failing_health_check_takes_an_engine_out_and_a_passing_one_brings_it_back(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    server = await start_gateway(farm.urls[:2], health_interval=3600.0)
    checker = server.health_checker
    assert checker is not None
    try:
        farm.healthy[0] = False
        await checker.check_once()
        for i in range(4):
            assert (await post(http, server, chat_body(f"q{i}")))[0] == 200
        assert (farm.served_by(0), farm.served_by(1)) == (0, 4)
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as ready:
            assert ready.status == 200
            engines = (await ready.json())["engines"]
        assert [(e["url"], e["in_rotation"]) for e in engines] == [(farm.urls[0], False), (farm.urls[1], True)]
        farm.healthy[0] = True
        await checker.check_once()
        for i in range(4):
            assert (await post(http, server, chat_body(f"r{i}")))[0] == 200
        assert (farm.served_by(0), farm.served_by(1)) == (2, 6)
    finally:
        await server.stop()


async def test_readiness_fails_only_when_no_engine_is_ready(farm: EngineFarm, http: aiohttp.ClientSession) -> None:
    server = await start_gateway(farm.urls[:2], health_interval=3600.0)
    checker = server.health_checker
    assert checker is not None
    try:
        farm.healthy[0] = False
        await checker.check_once()
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as ready:
            assert ready.status == 200
        farm.healthy[1] = False
        await checker.check_once()
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as ready:
            assert ready.status == 503
            assert [e["ready"] for e in (await ready.json())["engines"]] == [False, False]
    finally:
        await server.stop()


async def test_prefix_affinity_keeps_a_conversation_on_one_engine(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    server = await start_gateway(farm.urls, mode="prefix-affinity")
    try:
        for turn in range(1, 6):
            assert (await post(http, server, chat_body("Tell me about Lyon.", turn)))[0] == 200
        assert len({engine for engine, _ in farm.arrivals}) == 1
        farm.arrivals.clear()
        for i in range(30):
            assert (await post(http, server, chat_body(f"conversation {i}")))[0] == 200
        assert len({engine for engine, _ in farm.arrivals}) == 3
        picks = [
            await metric(http, server, "flushgate_engine_routing_decisions_total", engine=url, reason="affinity")
            for url in farm.urls
        ]
        assert sum(p or 0 for p in picks) == 35
    finally:
        await server.stop()


async def test_least_outstanding_spreads_one_conversation_over_the_engines(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    server = await start_gateway(farm.urls)
    try:
        for turn in range(1, 7):
            assert (await post(http, server, chat_body("Tell me about Lyon.", turn)))[0] == 200
    finally:
        await server.stop()
    assert [farm.served_by(i) for i in range(3)] == [2, 2, 2]


async def test_one_upstream_keeps_its_readiness_body_and_serves_as_before(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    server = Server(Config(upstream=farm.urls[0], port=0, routing=Routing()))
    await server.start()
    try:
        assert server.health_checker is None
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as ready:
            assert await ready.json() == {"ready": True, "upstream": farm.urls[0], "health_status": 200}
        with capture_logs() as logs:
            assert (await post(http, server, chat_body("hello")))[0] == 200
        assert records(logs)[0]["engine"] == farm.urls[0]
    finally:
        await server.stop()
