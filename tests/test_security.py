"""Who gets in and what reaches the engine: API keys, the route allowlist, size and concurrency limits, CORS."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from flushgate.cli import build_parser, config_from_args
from flushgate.config import Access, Config, ConfigError, Limits
from flushgate.proxy.auth import ApiKeys
from flushgate.proxy.engine_routes import INFERENCE_ROUTES, RoutePolicy
from flushgate.server import Server
from tests.fakes import FakeUpstream, Handler, sse_chunk, start_stream
from tests.raw_http import RawResponse, exchange, parse_response, request_bytes

GUARD_S = 15
KEY = "sk-test-0123456789"


@asynccontextmanager
async def guarded(fake: FakeUpstream, access: Access | None = None, limits: Limits | None = None) -> AsyncIterator[str]:
    server = Server(Config(upstream=fake.url, port=0, access=access or Access(), limits=limits or Limits()))
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def openai_error(body: object) -> dict[str, object]:
    assert isinstance(body, dict)
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- API keys -------------------------------------------------------------------------------------------------


async def test_a_request_without_a_valid_key_gets_401_in_openai_shape_and_never_reaches_the_engine(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with guarded(fake, Access(api_keys=(KEY,))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            async with http.post(url + "/v1/chat/completions", json={}, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                error = openai_error(await resp.json())
            assert error["code"] == "invalid_api_key"
    assert fake.seen == []


async def test_ollama_routes_answer_401_in_ollamas_shape(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with (
        guarded(fake, Access(api_keys=(KEY,))) as url,
        http.post(url + "/api/chat", json={"model": "m", "messages": []}) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)


async def test_only_the_chat_pages_static_files_are_open_without_a_key(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with guarded(fake, Access(api_keys=(KEY,))) as url:
        async with http.get(url + "/", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
        async with http.get(url + "/ui/chat.js") as resp:
            assert resp.status == 200
        for path, accept in (("/", "*/*"), ("/api/tags", "*/*"), ("/v1/models", "text/html")):
            async with http.get(url + path, headers={"Accept": accept}) as resp:
                assert resp.status == 401, path
    assert fake.seen == []


async def test_any_configured_key_is_accepted_and_none_is_passed_on_to_the_engine(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with guarded(fake, Access(api_keys=(KEY, "second-key"))) as url:
        for key in (KEY, "second-key"):
            async with http.post(
                url + "/v1/chat/completions", data=b"{}", headers={"Authorization": f"bearer {key}"}
            ) as resp:
                assert resp.status == 200
    assert len(fake.seen) == 2
    assert all("authorization" not in seen.headers for seen in fake.seen)


async def test_probes_stay_open_and_metrics_needs_a_key_only_when_asked(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async def engine_health(request: web.Request) -> web.Response:
        return web.Response()

    fake.handler = engine_health
    async with guarded(fake, Access(api_keys=(KEY,))) as url:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with http.get(url + path) as resp:
                assert resp.status == 200, path
    async with guarded(fake, Access(api_keys=(KEY,), metrics_auth=True)) as url:
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 401
        async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200
            assert "flushgate_requests_total" in await resp.text()


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the work done is the same for the first key, the last key and a wrong one."""
    compared: list[int] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(a) + len(b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(["k1", "a-much-longer-second-key", "k3"])
    for token, expected in (("k1", True), ("k3", True), ("nope", False), ("x" * 500, False)):
        compared.clear()
        assert keys.accepts(token) is expected
        assert compared == [64, 64, 64]  # three SHA-256 digests compared, whatever the token's length


def test_keys_come_from_flags_the_environment_and_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("FLUSHGATE_API_KEY", "env-key-1,env-key-2")
    args = build_parser().parse_args(
        ["serve", "--upstream", "http://127.0.0.1:1", "--api-key", "flag-key", "--api-key-file", str(key_file)]
    )
    config = config_from_args(args)
    assert config.access.api_keys == ("env-key-1", "env-key-2", "flag-key", "file-key-1", "file-key-2")


def test_help_never_shows_a_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLUSHGATE_API_KEY", "very-secret-key")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "--api-key KEY" in shown
    assert "very-secret-key" not in shown


def test_an_empty_key_file_or_a_key_with_spaces_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no key"):
        config_from_args(build_parser().parse_args(["serve", "--upstream", "http://x:1", "--api-key-file", str(empty)]))
    with pytest.raises(ConfigError, match="API key"):
        Config(upstream="http://x:1", access=Access(api_keys=("two words",))).validate()
    with pytest.raises(ConfigError, match="--metrics-auth"):
        Config(upstream="http://x:1", access=Access(metrics_auth=True)).validate()


# --- which routes reach the engine ------------------------------------------------------------------------------

# vLLM 0.32's routes that change or inspect the engine rather than use it; none may reach it through the gateway.
VLLM_ADMIN_ROUTES = (
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/v1/chat/completions/render"),
    ("POST", "/v1/completions/render"),
    ("POST", "/v1/chat/completions/derender"),
    ("POST", "/v1/chat/completions/batch"),
    ("GET", "/v1/realtime"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"),
    ("POST", "/reset_encoder_cache"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/release_kv_cache_memory"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("POST", "/collective_rpc"),
    ("POST", "/scale_elastic_ep"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/abort_requests"),
    ("POST", "/update_weights"),
    ("POST", "/init_weight_transfer_engine"),
    ("GET", "/server_info"),
    ("GET", "/load"),
    ("POST", "/inference/v1/generate"),
    ("POST", "/invocations"),
    ("GET", "/metrics/../server_info"),
)


async def test_vllms_admin_and_debug_routes_are_refused_in_openai_shape(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    for method, path in VLLM_ADMIN_ROUTES:
        async with http.request(method, gateway_url + path, data=b"{}") as resp:
            assert resp.status in (403, 404), path
            error = openai_error(await resp.json())
            assert error["code"] in ("route_not_allowed", "not_found"), path
    assert fake.seen == []


def filled(route: str) -> str:
    return route.replace("{response_id}", "resp-123")


async def test_every_inference_and_listing_route_is_forwarded(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    for route in INFERENCE_ROUTES:
        async with http.post(gateway_url + filled(route) + "?x=1", data=b"{}") as resp:
            assert resp.status == 200, route
    assert [seen.raw_path for seen in fake.seen] == [filled(route) + "?x=1" for route in INFERENCE_ROUTES]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/../load_lora_adapter",
        "/v1/models/%2e%2e/load_lora_adapter",
        "/v1/responses/..%2Fload_lora_adapter",
        "/v1/responses/a%2Fb",
        "/v1/responses/%2e",
        "/v1/responses/%ff%fe",
        "/v1/responses/%00",
        "//v1/models",
        "/v1//models",
        "/v1/models/",
        "http://elsewhere.example/v1/models",
        "http://127.0.0.1/v1/load_lora_adapter",
    ],
)
async def test_path_tricks_never_reach_an_unlisted_route(fake: FakeUpstream, gateway: Server, target: str) -> None:
    response = await exchange(gateway.port, request_bytes("POST", target, body=b"{}"))
    assert 400 <= response.status < 500
    openai_error(response.json())
    assert fake.seen == []


async def test_an_operator_can_allow_one_more_route(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with guarded(fake, Access(allow_routes=("/v1/load_lora_adapter",))) as url:
        async with http.post(url + "/v1/load_lora_adapter", data=b"{}") as resp:
            assert resp.status == 200
        async with http.post(url + "/v1/unload_lora_adapter", data=b"{}") as resp:
            assert resp.status == 403
    assert [seen.raw_path for seen in fake.seen] == ["/v1/load_lora_adapter"]


def test_route_patterns_match_one_segment_per_name_and_the_rest_after_a_star() -> None:
    policy = RoutePolicy(["/v1/files/{file_id}/content", "/v1/fine_tuning/*"])
    assert policy.allows("/v1/files/file-1/content?x=y")
    assert not policy.allows("/v1/files/a/b/content")
    assert not policy.allows("/v1/files/content")
    assert policy.allows("/v1/fine_tuning/jobs")
    assert policy.allows("/v1/fine_tuning/jobs/ft-1/events")
    assert not policy.allows("/v1/fine_tuning")
    assert not policy.allows("/v1/fine_tuning/jobs/../../load_lora_adapter")


def test_a_route_spelled_as_the_checks_refuse_it_is_not_allowed_by_its_spelling_either() -> None:
    """A route's own spelling is answered without decoding: only when the full checks allow that very string."""
    policy = RoutePolicy(["/v1/a/../load_lora_adapter", "/v1/x%2Fy", "/v1/%ff", "/v1/ok"])
    assert not policy.forwards("/v1/a/../load_lora_adapter")  # a dot segment
    assert not policy.forwards("/v1/x%2Fy")  # an encoded slash
    assert not policy.forwards("/v1/%ff")  # not UTF-8
    assert policy.forwards("/v1/ok")
    assert policy.forwards("/v1/chat/completions")


# --- limits -----------------------------------------------------------------------------------------------------


async def test_a_body_declared_over_the_limit_gets_413_before_the_engine_sees_it(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with guarded(fake, limits=Limits(max_body_bytes=1000)) as url:
        async with http.post(url + "/v1/chat/completions", data=b"x" * 1000) as resp:
            assert resp.status == 200
        async with http.post(url + "/v1/chat/completions", data=b"x" * 1001) as resp:
            assert resp.status == 413
            assert openai_error(await resp.json())["code"] == "request_too_large"
        async with http.post(url + "/api/chat", data=b"x" * 1001) as resp:
            assert resp.status == 413
            assert isinstance((await resp.json())["error"], str)
    assert len(fake.seen) == 1


async def test_overlong_or_too_many_headers_are_refused_in_the_apis_shape_before_any_handler(
    fake: FakeUpstream,
) -> None:
    limits = Limits(max_header_bytes=1024, max_headers=20)
    server = Server(Config(upstream=fake.url, port=0, limits=limits))
    await server.start()
    try:
        fits = [("X-Pad", "a" * 900)] + [(f"X-H{i}", "v") for i in range(15)]
        assert (await exchange(server.port, request_bytes("GET", "/version", fits))).status == 200
        too_long = await exchange(server.port, request_bytes("GET", "/version", [("X-Pad", "a" * 1100)]))
        too_many = await exchange(
            server.port, request_bytes("POST", "/v1/chat/completions", [(f"X-H{i}", "v") for i in range(30)])
        )
        long_target = await exchange(server.port, request_bytes("GET", "/v1/models?q=" + "a" * 1100))
        ollama = await exchange(server.port, request_bytes("POST", "/api/chat", [("X-Pad", "a" * 1100)]))
    finally:
        await server.stop()
    assert [too_long.status, too_many.status, long_target.status, ollama.status] == [431, 431, 414, 431]
    for answer, code in ((too_long, "request_header_too_large"), (too_many, "too_many_request_headers")):
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["connection"] == "close"
        assert openai_error(answer.json())["code"] == code
    assert openai_error(long_target.json())["code"] == "request_target_too_long"
    assert ollama.json() == {"error": "a request header is over 1024 bytes"}
    assert len(fake.seen) == 1


async def test_a_refused_head_is_answered_even_while_the_client_still_sends(fake: FakeUpstream) -> None:
    """The answer comes before the client has sent its whole head; closing at once with unread bytes would
    reset the connection and could destroy the answer on its way, so the gateway half-closes and reads on."""
    server = Server(Config(upstream=fake.url, port=0, limits=Limits(max_header_bytes=1024, max_headers=20)))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000 + b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
        assert answer.startswith(b"HTTP/1.1 431 ")
        writer.write(b"X-More: " + b"b" * 100_000 + b"\r\n\r\n")  # the client sends on after the answer
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), GUARD_S)  # the body, then EOF: the gateway's side is closed
        writer.close()
    finally:
        await server.stop()
    assert openai_error(orjson.loads(rest))["code"] == "request_header_too_large"
    assert fake.seen == []


async def test_without_the_own_server_aiohttps_parser_refuses_overlong_heads(fake: FakeUpstream) -> None:
    limits = Limits(max_header_bytes=1024, max_headers=20)
    server = Server(Config(upstream=fake.url, port=0, limits=limits, own_server=False))
    await server.start()
    try:
        too_long = await exchange(server.port, request_bytes("GET", "/version", [("X-Pad", "a" * 1100)]))
        too_many = await exchange(server.port, request_bytes("GET", "/version", [(f"X-H{i}", "v") for i in range(30)]))
    finally:
        await server.stop()
    assert [too_long.status, too_many.status] == [400, 400]
    assert fake.seen == []


async def test_a_head_sent_slowly_is_cut_off_at_the_header_timeout(fake: FakeUpstream) -> None:
    """Slowloris: a client that keeps sending header lines, never finishing, loses its connection on time."""
    timeout_s = 0.5
    server = Server(Config(upstream=fake.url, port=0, limits=Limits(header_timeout=timeout_s)))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def drip() -> None:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            for i in range(int(GUARD_S / 0.05)):
                try:
                    writer.write(f"X-Drip-{i}: {i}\r\n".encode())
                    await writer.drain()
                except ConnectionError:
                    return
                await asyncio.sleep(0.05)  # the planted slowness: one header line every 50 ms

        started = time.monotonic()
        dripping = asyncio.create_task(drip())
        answer = await asyncio.wait_for(reader.read(), GUARD_S)  # b"" once the gateway closes the connection
        closed_after = time.monotonic() - started
        dripping.cancel()
        writer.close()
        normal = await exchange(server.port, request_bytes("GET", "/version"))  # a prompt client is still served
    finally:
        await server.stop()
    assert answer == b""
    assert timeout_s * 0.9 <= closed_after <= timeout_s + 2.0
    assert normal.status == 200
    assert [seen.raw_path for seen in fake.seen] == ["/version"]


async def test_beyond_max_concurrent_requests_get_429_with_retry_after_until_a_slot_frees(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    cap = 5
    opened: asyncio.Queue[None] = asyncio.Queue()
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("first"))
        opened.put_nowait(None)
        await release.wait()
        await response.write(sse_chunk("last"))
        return response

    fake.handler = held
    async with guarded(fake, limits=Limits(max_concurrent=cap)) as url:
        streams = [await http.post(url + "/v1/chat/completions", data=b"{}") for _ in range(cap)]
        for _ in range(cap):
            await asyncio.wait_for(opened.get(), GUARD_S)
        async with http.post(url + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert openai_error(await resp.json())["code"] == "rate_limit_exceeded"
        async with http.post(url + "/api/generate", data=b"{}") as resp:
            assert resp.status == 429
            assert isinstance((await resp.json())["error"], str)
        for probe in ("/healthz", "/metrics"):
            async with http.get(url + probe) as resp:
                assert resp.status == 200
        release.set()
        for stream in streams:
            assert await asyncio.wait_for(stream.read(), GUARD_S) == sse_chunk("first") + sse_chunk("last")
            stream.release()
        async with http.post(url + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            assert await resp.read() == sse_chunk("first") + sse_chunk("last")
    assert opened.qsize() == 1  # of all the refused requests, none reached the engine


# --- CORS -------------------------------------------------------------------------------------------------------


def permissive_engine(calls: list[str]) -> Handler:
    """An engine started with its own wide-open CORS settings; notes each request it gets."""

    async def answer(request: web.Request) -> web.Response:
        calls.append(f"{request.method} {request.path}")
        return web.json_response(
            {"ok": True}, headers={"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}
        )

    return answer


async def test_cors_is_off_by_default_even_if_the_engine_allows_every_origin(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    calls: list[str] = []
    fake.handler = permissive_engine(calls)
    origin = {"Origin": "https://evil.example"}
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}", headers=origin) as resp:
        assert resp.status == 200
        assert not [name for name in resp.headers if name.lower().startswith("access-control-")]
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with http.options(gateway_url + "/v1/chat/completions", headers=preflight) as resp:
        assert resp.status == 403
        assert openai_error(await resp.json())["code"] == "cors_origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert calls == ["POST /v1/chat/completions"]  # the preflight never reached the engine


async def test_a_listed_origin_may_call_the_api_from_a_browser_and_others_may_not(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    calls: list[str] = []
    fake.handler = permissive_engine(calls)
    page = "https://chat.example.com"
    async with guarded(fake, Access(api_keys=(KEY,), cors_origins=(page,))) as url:
        preflight = {
            "Origin": page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        }
        async with http.options(url + "/v1/chat/completions", headers=preflight) as resp:  # no key: browsers send none
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == page
            assert resp.headers["Access-Control-Allow-Headers"] == preflight["Access-Control-Request-Headers"]
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        authed = {"Origin": page, "Authorization": f"Bearer {KEY}"}
        async with http.post(url + "/v1/chat/completions", data=b"{}", headers=authed) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == page
            assert "Access-Control-Allow-Credentials" not in resp.headers
            assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
            assert "Origin" in resp.headers.getall("Vary")
        async with http.post(url + "/v1/chat/completions", data=b"{}", headers={"Origin": page}) as resp:
            assert resp.status == 401  # and the page can read why
            assert resp.headers["Access-Control-Allow-Origin"] == page
        other = {"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"}
        async with http.post(url + "/v1/chat/completions", data=b"{}", headers=other) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
    assert calls == ["POST /v1/chat/completions"] * 2  # only the two requests with a key


async def test_a_star_lets_any_origin_read_without_credentials(fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with (
        guarded(fake, Access(cors_origins=("*",))) as url,
        http.get(url + "/v1/models", headers={"Origin": "https://anywhere.example"}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_limits_and_origins_are_validated_at_start() -> None:
    bad = [
        Limits(max_body_bytes=-1),
        Limits(max_headers=2),
        Limits(header_timeout=0),
        Limits(max_concurrent=-3),
    ]
    for limits in bad:
        with pytest.raises(ConfigError):
            Config(upstream="http://x:1", limits=limits).validate()
    for access in (Access(cors_origins=("chat.example.com",)), Access(allow_routes=("v1/x",))):
        with pytest.raises(ConfigError):
            Config(upstream="http://x:1", access=access).validate()


async def test_an_expect_header_other_than_100_continue_gets_417_in_the_apis_shape(
    fake: FakeUpstream, gateway: Server, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    not_utf8 = await exchange(
        gateway.port, request_bytes("POST", "/v1/chat/completions", [("Expect", "\udcff")], b"{}")
    )
    assert not_utf8.status == 417
    assert openai_error(not_utf8.json())["code"] == "expectation_failed"
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}", expect100=True) as resp:
        assert resp.status == 200
    assert len(fake.seen) == 1


CHUNKED_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> RawResponse:
    """One answer, read by its Content-Length as a client does (a server may linger before it closes)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    return parse_response(head + await asyncio.wait_for(reader.readexactly(length), GUARD_S), "POST")


async def answer_after(
    port: int, sent: bytes, then: Callable[[], Awaitable[object]] | None = None, more: bytes = b""
) -> tuple[RawResponse, float]:
    """Send ``sent``; once ``then`` is done, ``more``; keep the connection open. The answer, and how long after
    the last byte sent it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sent)
        if then is not None:
            await asyncio.wait_for(then(), GUARD_S)
            writer.write(more)
        await writer.drain()
        last_sent = time.monotonic()
        answer = await read_answer(reader)
        return answer, time.monotonic() - last_sent
    finally:
        writer.close()


@asynccontextmanager
async def body_reading_engines(
    count: int, body_timeout: float, own_server: bool = True
) -> AsyncIterator[tuple[Server, list[FakeUpstream], list[bytes]]]:
    """Engines that read each POST's whole body (kept in the list), behind a gateway with ``body_timeout``."""
    fakes = [FakeUpstream() for _ in range(count)]
    bodies: list[bytes] = []

    async def reads_the_body(request: web.Request) -> web.Response:
        if request.method == "POST":  # not the active health checks
            bodies.append(await request.read())
        return web.json_response({"ok": True})

    for fake in fakes:
        fake.handler = reads_the_body
        await fake.start()
    upstream = tuple(f.url for f in fakes) if count > 1 else fakes[0].url
    limits = Limits(body_timeout=body_timeout)
    server = Server(Config(upstream=upstream, port=0, limits=limits, own_server=own_server))
    await server.start()
    try:
        yield server, fakes, bodies
    finally:
        await server.stop()
        for fake in fakes:
            await fake.stop()


async def ejections_and_a_good_request(port: int) -> list[float]:
    """After the refusals: a normal request still reaches an engine, and how often each engine was ejected."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            families = text_string_to_metric_families(await resp.text())
    return [s.value for f in families for s in f.samples if s.name == "flushgate_engine_ejections_total"]


@pytest.mark.parametrize("engines", [1, 2], ids=["streamed to one engine", "read ahead for several"])
async def test_a_chunked_body_that_stops_gets_408_and_is_not_held_against_the_engine(engines: int) -> None:
    """nginx's client_body_timeout: a body that stops arriving is answered 408 after --body-timeout. It is the
    client's doing: four in a row (the ejection threshold is three failures) must not eject the engine."""
    async with body_reading_engines(engines, body_timeout=0.3) as (server, _, bodies):
        for _ in range(4):
            answer, after = await answer_after(server.port, CHUNKED_HEAD + b'4\r\n{"a"\r\n')
            assert answer.status == 408
            assert openai_error(answer.json())["code"] == "request_body_timeout"
            assert 0.3 <= after < GUARD_S
        assert await ejections_and_a_good_request(server.port) == [0.0] * engines
    assert bodies == [b"{}"]  # no engine ever took a cut body for a whole one


async def test_broken_chunk_framing_is_refused_in_the_apis_shape() -> None:
    """Read with the head, the front refuses it at once (aiohttp's parser would drop the request for a bare 400);
    once the request is with the engine, aiohttp's parser leaves the body waiting, and the body timeout ends it."""
    broken = b"zz\r\nnot a chunk size\r\n"
    async with body_reading_engines(1, body_timeout=0.3) as (server, fakes, bodies):
        at_once, _ = await answer_after(server.port, CHUNKED_HEAD + b'4\r\n{"a"\r\n' + broken)
        later, after = await answer_after(
            server.port, CHUNKED_HEAD + b'4\r\n{"a"\r\n', fakes[0].requests_started.wait, broken
        )
        assert await ejections_and_a_good_request(server.port) == [0.0]
    assert at_once.status == 400
    assert openai_error(at_once.json())["code"] == "request_body_unreadable"
    assert later.status == 408
    assert 0.3 <= after < GUARD_S
    assert openai_error(later.json())["code"] == "request_body_timeout"
    assert bodies == [b"{}"]


@pytest.mark.parametrize(
    ("path", "own_server"),
    [("/v1/chat/completions", True), ("/v1/chat/completions", False), ("/api/chat", True)],
    ids=["own server", "aiohttp's server", "Ollama route"],
)
async def test_a_body_shorter_than_its_content_length_gets_408_in_the_apis_shape(path: str, own_server: bool) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
    async with body_reading_engines(1, body_timeout=0.3, own_server=own_server) as (server, _, bodies):
        answer, after = await answer_after(server.port, head + b'{"model": "m"')
        assert await ejections_and_a_good_request(server.port) == [0.0]
    assert answer.status == 408
    assert 0.3 <= after < GUARD_S
    if path.startswith("/api/"):
        assert answer.json() == {"error": "the request body stopped arriving: no part of it came for 0.3 s"}
    else:
        assert openai_error(answer.json())["code"] == "request_body_timeout"
    assert bodies == [b"{}"]
