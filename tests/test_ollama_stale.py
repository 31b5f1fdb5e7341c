"""The Ollama routes' pooled engine connections: one the engine closes under a request with no answer (its idle
close crossing the request) sends the request once more on a new connection, held against nobody."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.fakes import FakeModel, FakeUpstream, Handler, ScriptedEngine, assert_resent_once_unheld, stream_hello

CHAT = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": False})


async def hang_up(request: web.Request) -> web.StreamResponse:
    """The connection closes with no byte of an answer, as when the engine's idle close crosses the request."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.Future()  # aiohttp cancels this handler when it sees the connection lost
    raise AssertionError("the handler outlived its connection")


class InTurn:
    """The n-th call answered by ``handlers[n]``; ``connections`` the peer port each call came from."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.connections: list[int] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.connections.append(peer[1] if peer else 0)
        return await self.handlers[len(self.connections) - 1](request)


@pytest.fixture
def engine(fake: FakeUpstream) -> ScriptedEngine:
    scripted = ScriptedEngine(models=[FakeModel()])
    fake.handler = scripted
    return scripted


async def test_a_chat_whose_pooled_connection_the_engine_closes_unanswered_is_sent_once_more_on_a_new_one(
    engine: ScriptedEngine, fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    calls = InTurn(stream_hello, hang_up, stream_hello)
    engine.generation = calls
    async with http.post(gateway_url + "/api/chat", data=CHAT) as resp:
        assert resp.status == 200
    with capture_logs() as logs:
        async with http.post(gateway_url + "/api/chat", data=CHAT) as resp:
            assert resp.status == 200
            assert (await resp.json())["message"]["content"] == "Hello"
    assert len(engine.generations) == 3
    assert calls.connections[2] != calls.connections[1]  # sent again on a new connection
    await assert_resent_once_unheld(logs, gateway_url, fake.url)


async def test_only_once_a_new_connection_closed_unanswered_is_a_502_in_ollamas_shape(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = InTurn(stream_hello, hang_up, hang_up, stream_hello)
    async with http.post(gateway_url + "/api/chat", data=CHAT) as resp:
        assert resp.status == 200
    async with http.post(gateway_url + "/api/chat", data=CHAT) as resp:
        assert resp.status == 502
        assert "failed before answering" in (await resp.json())["error"]
    assert len(engine.generations) == 3


async def test_an_embedding_whose_pooled_connection_the_engine_closes_unanswered_is_sent_once_more(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"index": 0, "embedding": [0.5]}], "usage": {"prompt_tokens": 1}})

    calls = InTurn(embeddings, hang_up, embeddings)
    engine.embeddings = calls
    for _ in range(2):
        async with http.post(gateway_url + "/api/embeddings", json={"model": "fake-model", "prompt": "a"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"embedding": [0.5]}
    assert len(calls.connections) == 3
    assert calls.connections[2] != calls.connections[1]
