"""A scriptable OpenAI-shaped upstream: each test decides exactly what the "engine" sends and when."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SeenRequest:
    method: str
    raw_path: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class FakeUpstream:
    """An aiohttp server whose behaviour is the ``handler`` a test assigns.

    ``peer_gone`` is set when a handler is cancelled because the gateway closed the connection, which is how a
    real vLLM learns that a request was aborted.
    """

    handler: Handler | None = None
    seen: list[SeenRequest] = field(default_factory=list)
    peer_gone: asyncio.Event = field(default_factory=asyncio.Event)
    requests_started: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0  # 0: any free port; the bound one after start()
    host: str = "127.0.0.1"
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests_started.set()
        try:
            if self.handler is None:
                return await record_and_echo(self, request)
            return await self.handler(request)
        except asyncio.CancelledError:
            self.peer_gone.set()
            raise


async def record_and_echo(fake: FakeUpstream, request: web.Request) -> web.Response:
    """Default behaviour: remember the request and answer with a small JSON body."""
    body = await request.read()
    headers: dict[str, list[str]] = {}
    for key, value in request.headers.items():
        headers.setdefault(key.lower(), []).append(value)
    fake.seen.append(SeenRequest(request.method, request.raw_path, headers, body))
    return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")


def sse_chunk(content: str, index: int = 0, model: str = "fake-model") -> bytes:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": index, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def start_stream(request: web.Request, content_type: str = "text/event-stream") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    return response


def held_stream(release: asyncio.Event, before: bytes, after: bytes) -> Handler:
    """An engine answer that sends ``before``, waits for ``release``, then sends ``after``."""

    async def held(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(before)
        await release.wait()
        await response.write(after)
        return response

    return held


def chat_event(
    content: str | None = None,
    *,
    reasoning: str | None = None,
    tool_calls: list[dict[str, object]] | None = None,
    finish_reason: str | None = None,
    model: str = "fake-model",
) -> bytes:
    """One vLLM chat-completion chunk as an SSE event, with only the delta fields given."""
    delta: dict[str, object] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def completion_event(text: str, finish_reason: str | None = None, model: str = "fake-model") -> bytes:
    """One vLLM text-completion chunk as an SSE event."""
    event = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def usage_event(prompt_tokens: int, completion_tokens: int, model: str = "fake-model") -> bytes:
    """The last chunk vLLM sends with ``stream_options.include_usage``: no choices, the token counts."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    event = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
    return b"data: " + orjson.dumps(event) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


@dataclass
class FakeModel:
    id: str = "fake-model"
    max_model_len: int = 4096
    root: str | None = None
    thinking: bool = False  # its chat template renders enable_thinking on and off differently
    tools: bool = False  # its chat template renders tools


@dataclass
class GenerationRequest:
    path: str
    body: dict[str, object]


@dataclass
class ScriptedEngine:
    """The OpenAI surface of vLLM that the Ollama translation uses, each part scriptable by a test.

    ``/v1/models`` lists ``models``; ``/tokenize`` renders differently per model capability (how the gateway
    learns about thinking and tools); generation requests are recorded in ``generations`` and answered by
    ``generation`` (by default a short streamed "Hello" with usage).
    """

    models: list[FakeModel] = field(default_factory=lambda: [FakeModel()])
    generation: Handler | None = None
    embeddings: Handler | None = None
    generations: list[GenerationRequest] = field(default_factory=list)
    model_list_requests: int = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            self.model_list_requests += 1
            data = [
                {"id": m.id, "object": "model", "root": m.root, "max_model_len": m.max_model_len, "created": 0}
                for m in self.models
            ]
            return web.json_response({"object": "list", "data": data})
        body = await request.json()
        if request.path == "/tokenize":
            return web.json_response({"tokens": self._rendered(body)})
        if request.path in ("/v1/chat/completions", "/v1/completions"):
            self.generations.append(GenerationRequest(request.path, body))
            return await (self.generation or stream_hello)(request)
        if request.path == "/v1/embeddings" and self.embeddings is not None:
            return await self.embeddings(request)
        return web.json_response({"detail": "Not Found"}, status=404)  # FastAPI's answer for a route it lacks

    def _rendered(self, body: dict[str, object]) -> list[int]:
        model = next(m for m in self.models if m.id == body["model"])
        tokens = [1, 2, 3]
        kwargs = body.get("chat_template_kwargs")
        if model.thinking and isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False:
            tokens += [4, 5]
        if model.tools and body.get("tools"):
            tokens += [6]
        return tokens


async def stream_hello(request: web.Request) -> web.StreamResponse:
    response = await start_stream(request)
    for event in (chat_event("Hel"), chat_event("lo"), chat_event(finish_reason="stop"), usage_event(5, 2)):
        await response.write(event)
    await response.write(DONE_EVENT)
    return response


async def export_llm_span(endpoint: str, engine_id: str, timing: dict[str, float], completion_tokens: int) -> None:
    """Post one ``llm_request`` span as vLLM exports it over OTLP/HTTP (protobuf)."""
    import aiohttp
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def attr(key: str, value: AnyValue) -> KeyValue:
        return KeyValue(key=key, value=value)

    span = Span(
        name="llm_request",
        attributes=[
            attr("gen_ai.request.id", AnyValue(string_value=engine_id)),
            attr("gen_ai.latency.time_in_queue", AnyValue(double_value=timing["queue"])),
            attr("gen_ai.latency.time_in_model_prefill", AnyValue(double_value=timing["prefill"])),
            attr("gen_ai.latency.time_in_model_decode", AnyValue(double_value=timing["decode"])),
            attr("gen_ai.usage.completion_tokens", AnyValue(int_value=completion_tokens)),
        ],
    )
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    async with aiohttp.ClientSession() as session, session.post(endpoint, data=body.SerializeToString()) as resp:
        assert resp.status == 200


async def assert_resent_once_unheld(logs: Sequence[Mapping[str, Any]], gateway_url: str, engine_url: str) -> None:
    """The one request record says the engine closed a pooled connection under it and it was sent again, with no
    failover, and ``/metrics`` counts that once."""
    import aiohttp

    (record,) = [entry for entry in logs if entry["event"] == "request"]
    assert record["stale_connection_resent"] == engine_url
    assert record["outcome"] == "completed"
    assert "failover" not in record
    async with aiohttp.ClientSession() as http, http.get(gateway_url + "/metrics") as resp:
        assert f'flushgate_engine_stale_resends_total{{engine="{engine_url}"}} 1.0' in await resp.text()
