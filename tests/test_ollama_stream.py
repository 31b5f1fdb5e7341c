"""Ollama's NDJSON stream over the engine's SSE: one line per event, at once, and never a silent end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from flushgate.config import Config, Timeouts
from flushgate.proxy.ollama import api, lines, relay
from flushgate.server import Server
from tests.fakes import (
    DONE_EVENT,
    FakeModel,
    FakeUpstream,
    Handler,
    ScriptedEngine,
    chat_event,
    completion_event,
    start_stream,
    usage_event,
)

GUARD_S = 10  # only fires if the property under test is broken


@pytest.fixture
def engine(fake: FakeUpstream) -> ScriptedEngine:
    scripted = ScriptedEngine(models=[FakeModel(thinking=True, tools=True)])
    fake.handler = scripted
    return scripted


def scripted(*events: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for event in events:
            await response.write(event)
        return response

    return handler


async def read_lines(resp: aiohttp.ClientResponse) -> list[dict[str, object]]:
    body = await resp.read()
    assert body.endswith(b"\n")
    return [orjson.loads(line) for line in body.split(b"\n")[:-1]]


async def test_each_engine_event_is_one_line_that_reaches_the_client_before_the_next_event(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    words = [f"word{i} " for i in range(12)]
    acks: asyncio.Queue[int] = asyncio.Queue()

    async def lockstep(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        for k, word in enumerate(words):
            await response.write(chat_event(word))
            assert await asyncio.wait_for(acks.get(), GUARD_S) == k  # the next event only once line k arrived
        for event in (chat_event(finish_reason="stop"), usage_event(7, 12), DONE_EVENT):
            await response.write(event)
        return response

    engine.generation = lockstep
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "count"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers["X-Accel-Buffering"] == "no"
        for k, word in enumerate(words):
            line = await asyncio.wait_for(resp.content.readline(), GUARD_S)
            assert orjson.loads(line)["message"] == {"role": "assistant", "content": word}
            acks.put_nowait(k)
        final = orjson.loads(await resp.content.readline())
        assert await resp.content.read() == b""
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 12)


async def test_thinking_goes_to_message_thinking_and_the_answer_to_content(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(
        chat_event(reasoning="Let me see."),
        chat_event(reasoning=" Two."),
        chat_event("It is 2."),
        chat_event(finish_reason="stop"),
        usage_event(9, 4),
        DONE_EVENT,
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "1+1?"}], "think": True}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        got = await read_lines(resp)
    assert [line["message"] for line in got[:-1]] == [
        {"role": "assistant", "content": "", "thinking": "Let me see."},
        {"role": "assistant", "content": "", "thinking": " Two."},
        {"role": "assistant", "content": "It is 2."},
    ]
    assert got[-1]["done"] is True
    assert engine.generations[0].body["chat_template_kwargs"] == {"enable_thinking": True}


async def test_stream_false_answers_one_object_with_the_whole_message(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(
        chat_event(reasoning="Hmm"),
        chat_event("Hel"),
        chat_event("lo"),
        chat_event(finish_reason="length"),
        usage_event(3, 3),
        DONE_EVENT,
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        got = await resp.json()
    assert got["message"] == {"role": "assistant", "content": "Hello", "thinking": "Hmm"}
    assert got["done"] is True
    assert got["done_reason"] == "length"
    assert (got["prompt_eval_count"], got["eval_count"]) == (3, 3)
    assert engine.generations[0].body["stream"] is True  # the engine always streams: that is what gives timings


async def test_tool_call_fragments_become_one_whole_call_with_object_arguments(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    engine.generation = scripted(
        chat_event(tool_calls=[start]),
        chat_event(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        chat_event(tool_calls=[{"index": 0, "function": {"arguments": '"Tokyo"}'}}]),
        chat_event(finish_reason="tool_calls"),
        usage_event(30, 12),
        DONE_EVENT,
    )
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "weather in Tokyo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    }
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        got = await read_lines(resp)
    assert len(got) == 2
    assert got[0]["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}
        ],
    }
    assert got[1]["done_reason"] == "stop"  # Ollama ends a tool-call message with "stop"


async def test_tool_call_with_arguments_that_are_not_json_ends_the_stream_with_an_error_line(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    engine.generation = scripted(chat_event(tool_calls=[call]), chat_event(finish_reason="tool_calls"), DONE_EVENT)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        got = await read_lines(resp)
    assert list(got[-1]) == ["error"]
    assert "not JSON" in str(got[-1]["error"])


async def test_engine_dying_mid_stream_ends_the_stream_with_an_error_line(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(chat_event("partial"))
        assert request.transport is not None
        request.transport.close()
        return response

    engine.generation = dies
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        got = await read_lines(resp)
    assert got[0]["message"] == {"role": "assistant", "content": "partial"}
    assert list(got[-1]) == ["error"]
    assert "before it was complete" in str(got[-1]["error"])


async def test_engine_stream_without_its_done_marker_is_not_taken_as_complete(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(chat_event("cut"), chat_event(finish_reason="stop"))  # then a clean end of body
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        got = await read_lines(resp)
    assert "done" not in got[-1]
    assert "before it was complete" in str(got[-1]["error"])


async def test_an_error_event_from_the_engine_ends_the_stream_with_its_message(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    error = b'data: {"error": {"message": "engine out of memory", "type": "InternalServerError", "code": 500}}\n\n'
    engine.generation = scripted(chat_event("a"), error, DONE_EVENT)
    body = {"model": "fake-model", "prompt": "x"}
    async with http.post(gateway_url + "/api/generate", json=body) as resp:
        got = await read_lines(resp)
    assert got == [
        {"model": "fake-model", "created_at": got[0]["created_at"], "response": "a", "done": False},
        {"error": "engine out of memory"},
    ]


async def test_stream_false_with_a_broken_engine_is_a_502_in_ollamas_shape(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(chat_event("cut"))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": False}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert resp.status == 502
        got = await resp.json()
    assert list(got) == ["error"]


async def test_generate_streams_response_text_and_thinking(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(
        chat_event(reasoning="hm"),
        chat_event("Paris"),
        chat_event(finish_reason="stop"),
        usage_event(12, 2),
        DONE_EVENT,
    )
    body = {"model": "fake-model", "prompt": "Capital of France?", "system": "Be brief."}
    async with http.post(gateway_url + "/api/generate", json=body) as resp:
        got = await read_lines(resp)
    assert [(g.get("response"), g.get("thinking")) for g in got[:-1]] == [("", "hm"), ("Paris", None)]
    assert got[-1]["response"] == ""
    assert got[-1]["done"] is True
    sent = engine.generations[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]


async def test_raw_generate_sends_the_prompt_untemplated_to_completions(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(
        completion_event(" blue"), completion_event(".", finish_reason="stop"), usage_event(4, 2), DONE_EVENT
    )
    body = {"model": "fake-model", "prompt": "The sky is", "raw": True, "stream": False}
    async with http.post(gateway_url + "/api/generate", json=body) as resp:
        got = await resp.json()
    assert got["response"] == " blue."
    sent = engine.generations[0]
    assert sent.path == "/v1/completions"
    assert sent.body["prompt"] == "The sky is"
    assert "messages" not in sent.body


async def test_client_leaving_mid_stream_closes_the_engine_request(
    fake: FakeUpstream, engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(chat_event("first"))
        await asyncio.Event().wait()  # until the gateway hangs up
        return response

    engine.generation = endless
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        assert orjson.loads(await resp.content.readline())["message"]["content"] == "first"
    await asyncio.wait_for(fake.peer_gone.wait(), GUARD_S)


@pytest.fixture
async def impatient_gateway(fake: FakeUpstream) -> AsyncIterator[str]:
    server = Server(Config(upstream=fake.url, port=0, timeouts=Timeouts(idle=0.2, drain=1)))
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.stop()


async def test_engine_silent_past_the_idle_timeout_ends_the_stream_with_an_error_line(
    engine: ScriptedEngine, impatient_gateway: str, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(chat_event("a"))
        await release.wait()
        return response

    engine.generation = stalls
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    try:
        async with http.post(impatient_gateway + "/api/chat", json=body) as resp:
            got = await read_lines(resp)
    finally:
        release.set()
    assert got[-1] == {"error": "the engine sent nothing for 0.2 s; the answer was ended"}


class SteppingClock:
    """Stands in for ``perf_counter_ns``: every call is one millisecond after the previous one."""

    def __init__(self) -> None:
        self.now = 0
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        self.now += 1_000_000
        return self.now


@pytest.fixture
def stepping_clock(monkeypatch: pytest.MonkeyPatch) -> SteppingClock:
    clock = SteppingClock()
    for module in (api, lines, relay):
        monkeypatch.setattr(module, "perf_counter_ns", clock)
    return clock


async def test_final_durations_are_the_gaps_between_the_phases_the_gateway_observed(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession, stepping_clock: SteppingClock
) -> None:
    # Clock reads, 1 ms apart: request start, engine headers, then one per event (3 tokens, finish, usage,
    # [DONE]), then the end of the answer.
    engine.generation = scripted(
        chat_event("a"),
        chat_event("b"),
        chat_event("c"),
        chat_event(finish_reason="stop"),
        usage_event(10, 3),
        DONE_EVENT,
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        final = (await read_lines(resp))[-1]
    ms = 1_000_000
    assert stepping_clock.calls == 9
    assert final["load_duration"] == 1 * ms  # start -> engine headers
    assert final["prompt_eval_duration"] == 1 * ms  # headers -> first token
    assert final["eval_duration"] == 4 * ms  # first token -> the engine's usage event
    assert final["total_duration"] == 8 * ms  # start -> final line


async def test_final_line_has_every_duration_positive_and_within_the_total(
    engine: ScriptedEngine, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway_url + "/api/chat", json=body) as resp:
        final = (await read_lines(resp))[-1]
    parts = [final["load_duration"], final["prompt_eval_duration"], final["eval_duration"]]
    assert all(isinstance(p, int) and p > 0 for p in parts)
    assert isinstance(final["total_duration"], int)
    assert sum(parts) <= final["total_duration"]  # type: ignore[arg-type]


async def test_each_ollama_answer_is_logged_as_one_request_record_of_the_ollama_api(
    engine: ScriptedEngine, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(
        chat_event(reasoning="a"), chat_event("b"), chat_event(finish_reason="stop"), usage_event(4, 2), DONE_EVENT
    )
    body = {"model": "fake-model:think", "messages": [{"role": "user", "content": "x"}]}
    with capture_logs() as logs:
        raw = orjson.dumps(body)
        async with http.post(gateway_url + "/api/chat", data=raw, headers={"X-Request-ID": "req-7"}) as resp:
            await resp.read()
        await gateway.stop()  # publishes every pending record
    (record,) = [entry for entry in logs if entry["event"] == "request"]
    assert (record["api"], record["path"], record["model"], record["stream"]) == (
        "ollama",
        "/api/chat",
        "fake-model:think",
        True,
    )
    assert (record["request_id"], record["status"], record["outcome"]) == ("req-7", 200, "completed")
    assert record["events_out"] == 3  # thinking, answer, final line
    assert record["upstream_ttfb_ms"] <= record["first_token_ms"] <= record["total_ms"]
    assert record["bytes_in"] == len(raw)


async def test_each_ollama_record_says_whether_its_engine_connection_was_new_or_pooled(
    engine: ScriptedEngine, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    engine.generation = scripted(chat_event("b"), chat_event(finish_reason="stop"), DONE_EVENT)
    raw = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    with capture_logs() as logs:
        for _ in range(2):
            async with http.post(gateway_url + "/api/chat", data=raw) as resp:
                await resp.read()
        await gateway.stop()
    first, second = [entry for entry in logs if entry["event"] == "request"]
    assert first["upstream_reused"] in (True, False)
    assert first["upstream_reused"] or first["upstream_connect_ms"] is not None
    assert second["upstream_reused"] is True  # the first answer was read to its end: its connection is pooled
