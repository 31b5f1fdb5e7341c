"""What crosses the gateway: method, path, query, body and end-to-end headers; what does not: hop-by-hop ones."""

from __future__ import annotations

import os
import re

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from flushgate.proxy.headers import new_request_id
from tests.fakes import FakeUpstream


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/version"),
        ("DELETE", "/v1/responses/resp-abc%20def?purpose=x%20y&a=1&a=2"),
    ],
)
async def test_method_raw_path_query_and_body_reach_upstream_unchanged(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    body = b'{"prompt": "caf\xc3\xa9"}' if method != "GET" else b""
    async with http.request(method, gateway_url + path, data=body or None) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}
    seen = fake.seen[-1]  # GET /v1/models first asks the engine's model list, for thinking aliases
    assert seen.method == method
    assert seen.raw_path == path
    assert seen.body == body


async def test_hop_by_hop_request_headers_are_dropped_and_end_to_end_ones_kept(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer sk-test",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "Accept-Encoding": "gzip",
    }
    async with http.post(gateway_url + "/v1/completions", data=b"{}", headers=headers) as resp:
        assert resp.status == 200
    (seen,) = fake.seen
    assert seen.headers["authorization"] == ["Bearer sk-test"]
    assert seen.headers["x-custom"] == ["kept"]
    for hop in ("x-private-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in seen.headers, hop
    assert seen.headers["accept-encoding"] == ["identity"]
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]


async def test_hop_by_hop_response_headers_are_dropped(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            text="fine",
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "secret",
                "X-Engine": "vllm",
                "Keep-Alive": "timeout=5",
            },
        )

    fake.handler = answer
    async with http.get(gateway_url + "/v1/models") as resp:
        assert await resp.text() == "fine"
        assert "X-Upstream-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["X-Engine"] == "vllm"


async def test_request_id_from_client_is_sent_upstream_and_returned(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway_url + "/v1/completions", data=b"{}", headers={"X-Request-ID": "req-42"}) as resp:
        assert resp.headers["X-Request-ID"] == "req-42"
    assert fake.seen[0].headers["x-request-id"] == ["req-42"]


async def test_request_id_is_made_when_the_client_sends_none(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway_url + "/v1/completions", data=b"{}") as resp:
        made = resp.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert fake.seen[0].headers["x-request-id"] == [made]


def test_request_ids_made_here_are_distinct_and_a_forked_worker_draws_its_own() -> None:
    made = {new_request_id() for _ in range(1000)}
    assert len(made) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", made_id) for made_id in made)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker of --workers: its ids must not repeat the parent's
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)
    ours = new_request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", from_child)
    assert from_child[:16] != ours[:16]  # another 64-bit random prefix


async def test_upstream_error_responses_pass_through_untouched(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    error = orjson.dumps({"error": {"message": "max_tokens too large", "type": "BadRequestError", "code": 400}})

    async def reject(request: web.Request) -> web.Response:
        return web.Response(status=400, body=error, content_type="application/json")

    fake.handler = reject
    async with http.post(gateway_url + "/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 400
        assert await resp.read() == error


async def test_unknown_path_is_a_404_in_openai_error_shape(gateway_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway_url + "/nope/at/all") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["code"] == "not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert "/nope/at/all" in body["error"]["message"]


async def test_one_record_is_logged_per_request(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        async with http.post(gateway_url + "/v1/completions?x=1", data=b"{}", headers={"X-Request-ID": "r1"}) as r:
            await r.read()
    records = [entry for entry in logs if entry["event"] == "request"]
    assert len(records) == 1
    record = records[0]
    assert record["request_id"] == "r1"
    assert record["method"] == "POST"
    assert record["path"] == "/v1/completions"
    assert record["status"] == 200
    assert record["outcome"] == "completed"
    assert record["bytes_out"] == len(b'{"ok":true}')
    assert record["total_ms"] > 0
    assert record["api"] == "openai"
    assert record["bytes_in"] == 2
