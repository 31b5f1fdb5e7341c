"""The Ollama routes over several engines: the same picking, counting, failover and record as the OpenAI ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.several_engines import GUARD_S, EngineFarm, records, start_farm, start_gateway, stop_farm
from tests.test_several_engines import answers_status, closed_url, hangs_up, held_open, metric

CHAT = "/api/chat"


@pytest.fixture
async def farm() -> AsyncIterator[EngineFarm]:
    farm = await start_farm(2)
    yield farm
    await stop_farm(farm)


def ollama_chat(question: str) -> bytes:
    return orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": question}]})


def lines(body: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in body.splitlines()]


def answer_text(body: bytes) -> str:
    return "".join(str(line["message"]["content"]) for line in lines(body) if isinstance(line.get("message"), dict))  # type: ignore[index]


async def test_open_streams_go_to_the_least_busy_engine_and_count_against_it(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    farm.script = [held_open(release)] * 2  # type: ignore[list-item]
    server = await start_gateway(farm.urls)
    base = f"http://127.0.0.1:{server.port}"
    try:
        with capture_logs() as logs:
            streams = []
            for i in range(2):
                resp = await http.post(base + CHAT, data=ollama_chat(f"q{i}"))
                first = orjson.loads(await asyncio.wait_for(resp.content.readline(), GUARD_S))
                assert first["done"] is False
                streams.append(resp)
            assert sorted(engine for engine, _ in farm.arrivals) == [0, 1]
            for url in farm.urls:
                assert await metric(http, server, "flushgate_engine_outstanding_requests", engine=url) == 1
            release.set()
            for resp in streams:
                assert lines(await asyncio.wait_for(resp.read(), GUARD_S))[-1]["done"] is True
                resp.release()
            for url in farm.urls:
                assert await metric(http, server, "flushgate_engine_outstanding_requests", engine=url) == 0
        served = [(record["api"], record["engine"]) for record in records(logs)]
        assert sorted(served) == sorted(("ollama", url) for url in farm.urls)
    finally:
        await server.stop()


async def test_a_refused_engine_is_skipped_and_the_record_names_both(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    gone = closed_url()
    server = await start_gateway([gone, farm.urls[0]])
    try:
        with capture_logs() as logs:
            for i in range(3):
                async with http.post(f"http://127.0.0.1:{server.port}{CHAT}", data=ollama_chat(f"q{i}")) as resp:
                    assert resp.status == 200
                    assert answer_text(await resp.read()) == "from 0"
        failed_over = [record for record in records(logs) if "failover" in record]
        assert len(failed_over) == 1  # the refusing engine is out of rotation after its first refusal
        (attempt,) = failed_over[0]["failover"]
        assert attempt["engine"] == gone
        assert failed_over[0]["engine"] == farm.urls[0]
        assert farm.served_by(0) == 3
        assert await metric(http, server, "flushgate_engine_in_rotation", engine=gone) == 0
    finally:
        await server.stop()


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_gateway_error_from_one_engine_is_retried_on_the_other_with_the_same_body(
    farm: EngineFarm, http: aiohttp.ClientSession, status: int
) -> None:
    farm.script = [answers_status(status)]  # type: ignore[list-item]
    server = await start_gateway(farm.urls)
    try:
        async with http.post(f"http://127.0.0.1:{server.port}{CHAT}", data=ollama_chat("x" * 5000)) as resp:
            got_status, got = resp.status, await resp.read()
    finally:
        await server.stop()
    (first, sent_first), (second, sent_second) = farm.arrivals
    assert first != second
    assert sent_first == sent_second
    assert (got_status, answer_text(got)) == (200, f"from {second}")


async def test_when_every_engine_fails_the_client_gets_an_ollama_error_naming_the_last(
    farm: EngineFarm, http: aiohttp.ClientSession
) -> None:
    farm.script = [hangs_up, hangs_up]
    server = await start_gateway(farm.urls)
    try:
        with capture_logs() as logs:
            async with http.post(f"http://127.0.0.1:{server.port}{CHAT}", data=ollama_chat("hello")) as resp:
                status, got = resp.status, orjson.loads(await resp.read())
    finally:
        await server.stop()
    (record,) = records(logs)
    (first, _), (second, _) = farm.arrivals
    assert status == 502
    assert got["error"] == f"the engine at {farm.urls[second]} failed before answering: Server disconnected"
    assert record["engine"] == farm.urls[second]
    assert [attempt["engine"] for attempt in record["failover"]] == [farm.urls[first]]
    assert record["outcome"] == "upstream_error"


async def embeds(request: web.Request, engine: int) -> web.StreamResponse:
    return web.json_response({"data": [{"index": 0, "embedding": [float(engine), 0.5]}], "usage": {"prompt_tokens": 2}})


@pytest.mark.parametrize("first", ["refused", "hangs up", "answers 503"])
async def test_an_embedding_an_engine_fails_before_answering_is_made_by_the_other(
    farm: EngineFarm, http: aiohttp.ClientSession, first: str
) -> None:
    """An embedding changes nothing, so like a chat it goes on to another engine when the first fails before its
    answer; the failed engine is held to account (refused: out of rotation after its first refusal)."""
    urls = farm.urls
    if first == "refused":
        urls = [closed_url(), farm.urls[0]]
        farm.script = [embeds] * 3
    else:
        farm.script = [hangs_up if first == "hangs up" else answers_status(503), embeds, embeds, embeds]  # type: ignore[list-item]
    server = await start_gateway(urls)
    body = orjson.dumps({"model": "fake-model", "input": "hello"})
    answers = []
    try:
        with capture_logs() as logs:
            for _ in range(3):
                async with http.post(f"http://127.0.0.1:{server.port}/api/embed", data=body) as resp:
                    answers.append((resp.status, orjson.loads(await resp.read())))
        in_rotation = await metric(http, server, "flushgate_engine_in_rotation", engine=urls[0])
    finally:
        await server.stop()
    assert [status for status, _ in answers] == [200] * 3
    (event,) = [entry for entry in logs if entry["event"] == "embeddings_failover"]
    (attempt,) = event["failover"]
    assert attempt["engine"] != event["engine"]
    if first == "refused":
        assert attempt["engine"] == urls[0]
        assert in_rotation == 0
        assert [got["embeddings"] for _, got in answers] == [[[0.0, 0.5]]] * 3
    else:
        failed, served = farm.arrivals[0][0], farm.arrivals[1][0]
        assert failed != served
        assert event["engine"] == farm.urls[served]
        assert answers[0][1]["embeddings"] == [[float(served), 0.5]]
