"""A real vLLM engine killed, restarted and shut down under flushgate: no hang, no orphan."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import aiohttp
import pytest

from tests.real.conftest import GatewayProcess, live_group_members, start_managed

MODEL = "smollm2-135m-instruct"
# The first test also waits for the module's engine to start, then for it to start again after kill -9.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    gateway = start_managed()
    yield gateway
    gateway.stop(signal.SIGKILL)


async def chat(session: aiohttp.ClientSession, url: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def test_kill_9_of_the_engine_makes_it_unready_then_it_is_restarted_and_serves(
    gateway: GatewayProcess,
) -> None:
    engine_pid = gateway.engine["pid"]
    mark = gateway.mark()
    os.kill(engine_pid, signal.SIGKILL)
    exited = await asyncio.to_thread(gateway.wait_event, "engine_exited", after=mark, timeout_s=60)
    assert exited["exit_code"] == -signal.SIGKILL
    assert exited["last_lines"], "the engine's last log lines belong in the restart record"
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/readyz") as resp:
            assert resp.status == 503
        await asyncio.to_thread(gateway.wait_event, "engine_ready", after=mark)
        assert gateway.engine["pid"] != engine_pid
        assert live_group_members(engine_pid) == []
        async with session.get(gateway.url + "/readyz") as resp:
            assert resp.status == 200
        assert await chat(session, gateway.url) == 200


async def test_sigterm_lets_the_stream_finish_then_leaves_no_process(gateway: GatewayProcess) -> None:
    engine_pid = gateway.engine["pid"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "stream": True,
            "max_tokens": 64, "ignore_eos": True}  # fmt: skip
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as resp,
    ):
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        gateway.popen.send_signal(signal.SIGTERM)
        rest = await resp.content.read()
        async with session.get(gateway.url + "/readyz") as ready:
            assert ready.status == 503  # draining: still listening, no longer ready
    assert (first + rest).rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in rest
    assert await asyncio.to_thread(gateway.popen.wait, 120) == 0
    assert live_group_members(engine_pid) == []


def test_no_engine_outlives_a_gateway_killed_with_sigkill() -> None:
    gateway = start_managed()
    engine_pid = gateway.engine["pid"]
    assert live_group_members(engine_pid)
    gateway.stop(signal.SIGKILL)
    deadline = 60.0
    import time

    start = time.monotonic()
    while live_group_members(engine_pid) and time.monotonic() - start < deadline:
        time.sleep(0.1)  # the kernel's parent-death signal has no event to wait on
    assert live_group_members(engine_pid) == []
