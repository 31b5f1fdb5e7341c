"""Property-based bodies and headers against the /v1 and /api routes: whatever a client sends, the gateway
answers with an HTTP status below 500 and no traceback, and goes on serving.

The engine behind it is healthy and never answers 5xx itself, so any 5xx would be the gateway's own failure.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flushgate.config import Access, Config, Limits
from flushgate.proxy.ollama.options import TRANSLATED, WITHOUT_EFFECT
from flushgate.server import Server
from tests.fakes import FakeUpstream
from tests.raw_http import RawResponse, exchange

KEY = "sk-fuzz-key"
# `make fuzz` runs many more, with fresh random inputs each time.
EXAMPLES = int(os.environ.get("FLUSHGATE_FUZZ_EXAMPLES", "200"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one gateway serves every example, on purpose
    derandomize="FLUSHGATE_FUZZ_EXAMPLES" not in os.environ,  # in `make test` the same inputs on every run
)

POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/tokenize",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
]
FIELDS = [
    "model",
    "messages",
    "role",
    "content",
    "prompt",
    "stream",
    "options",
    "format",
    "images",
    "tools",
    "tool_calls",
    "think",
    "keep_alive",
    "max_tokens",
    "temperature",
    "stop",
    "input",
    "system",
    "template",
    "raw",
    "stream_options",
    "num_ctx",
    "seed",
    "logprobs",
]


GET_ROUTES = frozenset({"/v1/models", "/health", "/version"})


async def vllm_like(request: web.Request) -> web.StreamResponse:
    """Enough of vLLM's OpenAI server for any input: 400 in OpenAI's shape for what it cannot parse."""
    raw = await request.read()
    if request.method != ("GET" if request.path in GET_ROUTES else "POST"):
        return web.json_response({"detail": "Method Not Allowed"}, status=405)  # FastAPI's answer
    if request.path == "/v1/models":
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
    if request.path in ("/health", "/version"):
        return web.json_response({"version": "0"})
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        error = {"message": "invalid JSON body", "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)
    if request.path == "/tokenize":
        return web.json_response({"tokens": [1, 2, 3], "count": 3, "max_model_len": 4096})
    if request.path == "/v1/embeddings":
        return web.json_response({"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}], "model": "m"})
    if body.get("stream") is True:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake-model", "choices": []}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response
    message = {"role": "assistant", "content": "ok"}
    choice = {"index": 0, "message": message, "text": "ok", "finish_reason": "stop"}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    return web.json_response(
        {"id": "c", "object": "chat.completion", "model": "fake-model", "choices": [choice], "usage": usage}
    )


@pytest.fixture
async def fuzz_gateway(fake: FakeUpstream) -> AsyncIterator[Server]:
    fake.handler = vllm_like
    access = Access(api_keys=(KEY,), cors_origins=("https://chat.example.com",))
    server = Server(Config(upstream=fake.url, port=0, access=access, limits=Limits(max_body_bytes=1 << 20)))
    await server.start()
    yield server
    await server.stop()


def json_values() -> st.SearchStrategy[object]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=25,
    )


def dump(value: object) -> bytes:
    return json.dumps(value).encode()  # the standard library's encoder takes integers of any size


def maybe(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Usually a well-typed value, now and then anything at all."""
    return st.integers(min_value=0, max_value=9).flatmap(lambda n: strategy if n else json_values())


def plausible_requests() -> st.SearchStrategy[dict[str, object]]:
    """Requests shaped like real Ollama and OpenAI ones (the served model, known options with values of their
    type, messages with roles, now and then tools, formats or thinking), any field liable to hold the wrong
    type: these reach deep into the translation instead of stopping at its first check."""
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
    typed = {"number": st.floats(min_value=0, max_value=2), "integer": st.integers(-2, 4096), "boolean": st.booleans()}
    known_options = {**{name: kind for name, (_, kind) in TRANSLATED.items()}, **WITHOUT_EFFECT}
    option_values = {name: maybe(typed[kind]) for name, kind in known_options.items()}
    option_values |= {"num_predict": maybe(st.integers(-2, 64)), "stop": maybe(st.lists(text, max_size=2))}
    options = st.fixed_dictionaries({}, optional=option_values)
    function = st.fixed_dictionaries({"name": maybe(text), "arguments": maybe(st.dictionaries(text, json_values()))})
    message = st.fixed_dictionaries(
        {"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"])), "content": maybe(text)},
        optional={"tool_calls": maybe(st.lists(st.fixed_dictionaries({"function": maybe(function)}), max_size=2))},
    )
    tool = st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": maybe(st.fixed_dictionaries({"name": text, "parameters": json_values()})),
        }
    )
    core = st.fixed_dictionaries(
        {"model": maybe(st.just("fake-model"))},
        optional={
            "messages": maybe(st.lists(message, min_size=1, max_size=4)),
            "prompt": maybe(text),
            "input": maybe(text | st.lists(text, max_size=3)),
            "stream": maybe(st.booleans()),
            "options": maybe(options),
        },
    )
    extras = {
        "format": maybe(st.sampled_from(["json", {"type": "object"}])),
        "think": maybe(st.sampled_from([True, False, "low", "high"])),
        "tools": maybe(st.lists(tool, max_size=2)),
        "keep_alive": maybe(st.sampled_from(["5m", 0, -1, "1h"])),
        "system": maybe(text),
        "raw": maybe(st.booleans()),
        "images": maybe(st.lists(text, max_size=2)),
        "max_tokens": maybe(st.integers(min_value=-5, max_value=10_000)),
        "logprobs": maybe(st.booleans()),
        "temperature": maybe(st.floats(0, 2)),
    }
    extra = st.sampled_from(sorted(extras)).flatmap(lambda name: extras[name].map(lambda value: (name, value)))
    return st.tuples(core, st.lists(extra, max_size=2)).map(lambda parts: {**parts[0], **dict(parts[1])})


def request_bodies() -> st.SearchStrategy[bytes]:
    """Plausible requests most often, then JSON objects of the fields these APIs use, any JSON, and non-JSON."""
    plausible = plausible_requests().map(dump)
    objects = st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=8).map(dump)
    any_json = json_values().map(dump)
    return st.one_of(plausible, plausible, objects, any_json, st.binary(max_size=300))


def assert_clean(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    assert b"Traceback" not in body


async def still_serving(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get(base + "/healthz") as resp:
        assert resp.status == 200


@FUZZ_SETTINGS
@given(
    route=st.sampled_from(POST_ROUTES),
    body=request_bodies(),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)
async def test_any_body_on_any_route_gets_a_clean_answer(
    fuzz_gateway: Server, http: aiohttp.ClientSession, route: str, body: bytes, content_type: str
) -> None:
    base = f"http://127.0.0.1:{fuzz_gateway.port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    async with http.post(base + route, data=body, headers=headers) as resp:
        answer = await asyncio.wait_for(resp.read(), 30)
        event(f"{route} {resp.status}")  # shown with --hypothesis-show-statistics: how deep the inputs went
        assert_clean(resp.status, answer)
    await still_serving(http, base)


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NOTABLE_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-Request-ID",
    "Origin",
    "Accept-Encoding",
    "Connection",
    "Expect",
    "Transfer-Encoding",
    "Content-Encoding",
    "X-Flushgate-Timing",
    "Access-Control-Request-Method",
    "Host",
    "Cookie",
    "X-Forwarded-For",
]


def header_values() -> st.SearchStrategy[str]:
    """Visible ASCII, spaces and tabs, and bytes 0x80-0xFF (obs-text, which HTTP allows but UTF-8 may not)."""
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(["\t"])
    obs_text = st.integers(min_value=0x80, max_value=0xFF).map(lambda b: bytes([b]).decode("utf-8", "surrogateescape"))
    return st.text(printable | obs_text, max_size=60)


def headers() -> st.SearchStrategy[list[tuple[str, str]]]:
    names = st.sampled_from(NOTABLE_HEADERS) | st.text(st.sampled_from(TOKEN_CHARS), min_size=1, max_size=20)
    valued = st.tuples(names, header_values())
    bearer = st.sampled_from([[("Authorization", f"Bearer {KEY}")], []])
    return st.tuples(bearer, st.lists(valued, max_size=12)).map(lambda parts: parts[0] + parts[1])


@FUZZ_SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
    route=st.sampled_from([*POST_ROUTES, "/v1/models", "/api/tags", "/api/version", "/version"]),
    extra=headers(),
    body=st.sampled_from([b"", b"{}", b'{"model": "fake-model", "messages": [], "stream": true}']),
)
async def test_any_headers_on_any_route_get_a_clean_answer(
    fuzz_gateway: Server,
    http: aiohttp.ClientSession,
    method: str,
    route: str,
    extra: list[tuple[str, str]],
    body: bytes,
) -> None:
    lines = [f"{method} {route} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in extra]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    response: RawResponse | None
    try:
        response = await exchange(fuzz_gateway.port, raw, guard_s=30)
    except ConnectionResetError:
        response = None  # a request the HTTP parser rejects may be answered by closing the connection
    if response is not None:
        assert_clean(response.status, response.body)
    await still_serving(http, f"http://127.0.0.1:{fuzz_gateway.port}")
