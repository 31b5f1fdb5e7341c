"""The official ollama package works against the gateway unchanged (fake engine; the real one is in tests/real)."""

from __future__ import annotations

import ollama
import pytest
from aiohttp import web

from tests.fakes import DONE_EVENT, FakeModel, FakeUpstream, ScriptedEngine, chat_event, start_stream, usage_event


@pytest.fixture
def engine(fake: FakeUpstream) -> ScriptedEngine:
    scripted = ScriptedEngine(models=[FakeModel("qwen3", thinking=True)])
    fake.handler = scripted
    return scripted


async def thinking_then_answer(request: web.Request) -> web.StreamResponse:
    response = await start_stream(request)
    for event in (
        chat_event(reasoning="Sky"),
        chat_event("Blue"),
        chat_event(" light"),
        chat_event(finish_reason="stop"),
        usage_event(8, 3),
        DONE_EVENT,
    ):
        await response.write(event)
    return response


async def test_ollama_client_streams_a_chat_with_thinking(engine: ScriptedEngine, gateway_url: str) -> None:
    engine.generation = thinking_then_answer
    client = ollama.AsyncClient(host=gateway_url)
    parts = [
        part
        async for part in await client.chat(
            model="qwen3:think", messages=[{"role": "user", "content": "Why is the sky blue?"}], stream=True
        )
    ]
    assert [(p.message.thinking, p.message.content) for p in parts[:-1]] == [
        ("Sky", ""),
        (None, "Blue"),
        (None, " light"),
    ]
    last = parts[-1]
    assert last.done is True
    assert last.done_reason == "stop"
    assert (last.prompt_eval_count, last.eval_count) == (8, 3)
    assert last.total_duration is not None
    assert last.total_duration > 0


async def test_ollama_client_lists_shows_and_generates(engine: ScriptedEngine, gateway_url: str) -> None:
    engine.generation = thinking_then_answer
    client = ollama.AsyncClient(host=gateway_url)
    listed = await client.list()
    assert [m.model for m in listed.models] == ["qwen3:latest", "qwen3:think", "qwen3:nothink"]
    shown = await client.show("qwen3")
    assert shown.capabilities == ["completion", "thinking"]
    running = await client.ps()
    assert running.models[0].expires_at is not None
    reply = await client.generate(model="qwen3", prompt="Why is the sky blue?", think=True)
    assert (reply.thinking, reply.response, reply.done) == ("Sky", "Blue light", True)


async def test_ollama_client_raises_the_gateways_error_with_its_status(
    engine: ScriptedEngine, gateway_url: str
) -> None:
    client = ollama.AsyncClient(host=gateway_url)
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert (caught.value.status_code, caught.value.error) == (404, "model 'llama3' not found")
    with pytest.raises(ollama.ResponseError) as caught:
        await client.pull("llama3")
    assert caught.value.status_code == 403
