"""Probes, drain on shutdown, and the command line as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web

from flushgate.cli import build_parser, config_from_args, main
from flushgate.config import Config, ConfigError, Timeouts
from flushgate.server import Server
from tests.fakes import FakeUpstream, held_stream, sse_chunk

GUARD_S = 15


async def test_healthz_answers_without_the_engine(http: aiohttp.ClientSession) -> None:
    server = Server(Config(upstream="http://127.0.0.1:9", port=0))
    await server.start()
    try:
        async with http.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["ready"] is False
    finally:
        await server.stop()


async def test_readyz_follows_the_upstream_health(
    fake: FakeUpstream, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    health = {"status": 200}

    async def engine_health(request: web.Request) -> web.Response:
        assert request.path == "/health"
        return web.Response(status=health["status"])

    fake.handler = engine_health
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["ready"] is True
    health["status"] = 503
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 503


async def test_drain_lets_inflight_streams_finish_and_refuses_new_requests(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    fake.handler = held_stream(release, sse_chunk("before"), sse_chunk("after"))
    server = Server(Config(upstream=fake.url, port=0, timeouts=Timeouts(drain=GUARD_S)))
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    resp = await http.post(base + "/v1/chat/completions", data=b"{}")
    assert await resp.content.readany() == sse_chunk("before")

    server.begin_drain()  # what SIGTERM does first
    stopping = asyncio.create_task(server.stop())
    async with http.get(base + "/readyz") as ready:
        assert ready.status == 503
    async with http.post(base + "/v1/chat/completions", data=b"{}") as refused:
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["error"]["code"] == "draining"
    assert not stopping.done()
    release.set()
    assert await asyncio.wait_for(resp.content.read(), GUARD_S) == sse_chunk("after")
    await asyncio.wait_for(stopping, GUARD_S)


def test_flags_and_environment_build_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSHGATE_UPSTREAM", "http://10.0.0.1:8001")
    monkeypatch.setenv("FLUSHGATE_PORT", "9100")
    monkeypatch.setenv("FLUSHGATE_IDLE_TIMEOUT", "0")
    config = config_from_args(build_parser().parse_args(["serve", "--connect-timeout", "2.5"]))
    assert config.upstream == "http://10.0.0.1:8001"
    assert config.port == 9100
    assert config.timeouts == Timeouts(connect=2.5, idle=None, drain=30.0)
    flag_wins = config_from_args(build_parser().parse_args(["serve", "--port", "9200"]))
    assert flag_wins.port == 9200


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["serve", "--upstream", "localhost:8000"],
        ["serve", "--upstream", "http://127.0.0.1:8000/v1"],
        ["serve", "--upstream", "http://127.0.0.1:8000", "--connect-timeout", "0"],
    ],
)
def test_an_unusable_config_is_refused_with_a_clear_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flushgate: ")
    with pytest.raises(ConfigError):
        config_from_args(build_parser().parse_args(argv))


def test_a_bad_environment_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSHGATE_PORT", "eighty")
    with pytest.raises(SystemExit, match="FLUSHGATE_PORT"):
        build_parser()


async def test_the_installed_command_serves_logs_json_and_stops_on_sigterm(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flushgate",
        "serve",
        "--upstream",
        fake.url,
        "--port",
        "0",
        stdout=subprocess.PIPE,
        env={**os.environ, "FLUSHGATE_LOG_FORMAT": "json"},
    )
    assert proc.stdout is not None
    try:
        started = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), GUARD_S))
        assert started["event"] == "listening"
        url = started["url"]
        async with http.post(url + "/v1/completions", data=b"{}", headers={"X-Request-ID": "cli-1"}) as resp:
            assert await resp.json() == {"ok": True}
        record = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), GUARD_S))
        assert record["event"] == "request"
        assert record["request_id"] == "cli-1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), GUARD_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_thinking_aliases_from_the_command_line_reach_the_ollama_settings(fake: FakeUpstream) -> None:
    config = config_from_args(
        build_parser().parse_args(["serve", "--upstream", fake.url, "--thinking-aliases", "r=on"])
    )
    server = Server(Config(upstream=fake.url, port=0, thinking_aliases=config.thinking_aliases))
    await server.start()
    try:
        assert server.gateway is not None
        assert dict(server.gateway.ollama.thinking_aliases) == {"r": True}
    finally:
        await server.stop()
    with pytest.raises(ConfigError, match="--thinking-aliases"):
        config_from_args(build_parser().parse_args(["serve", "--upstream", fake.url, "--thinking-aliases", "x=maybe"]))
