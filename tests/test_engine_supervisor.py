"""The managed engine's lifecycle, against a stand-in vLLM (tests/fake_vllm) that each test steers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from flushgate.engine.logparse import LoadPhase
from flushgate.engine.process import group_alive
from flushgate.engine.supervisor import Backoff, EngineState
from tests.managed import managed_server, pid_alive, pids_of, recorded, supervisor_of, wait

GUARD_S = 30


async def test_the_gateway_listens_at_once_and_answers_503_while_the_model_loads(
    tmp_path: Path, engine_env: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv("FAKE_ENGINE_GATE", str(gate))
    server = await managed_server(tmp_path)
    sup = supervisor_of(server)
    base = f"http://127.0.0.1:{server.port}"
    try:
        await wait(sup, lambda s: s.phase is LoadPhase.STARTING_SERVER)
        async with http.post(base + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            error = (await resp.json())["error"]
        assert error["code"] == "engine_loading"
        assert "loading" in error["message"]
        assert "starting API server" in error["message"]
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            engine = (await resp.json())["engine"]
        assert engine["state"] == "starting"
        assert engine["phase"] == "starting API server"

        gate.touch()
        await asyncio.wait_for(sup.wait_ready(), GUARD_S)
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["engine"]["state"] == "ready"
        async with http.post(base + "/v1/chat/completions", json={"fake_tokens": 2}) as resp:
            assert resp.status == 200
            assert (await resp.content.readany()).startswith(b"data: ")
    finally:
        await server.stop()


async def test_preset_and_extra_arguments_reach_the_engine_untouched(tmp_path: Path, engine_env: Path) -> None:
    server = await managed_server(tmp_path, preset="cpu", engine_args=("--max-num-seqs", "7", "--seed=3"))
    try:
        await asyncio.wait_for(supervisor_of(server).wait_ready(), GUARD_S)
    finally:
        await server.stop()
    (args,) = [line for line in recorded(engine_env) if line.startswith("args ")]
    assert args == "args --enforce-eager --dtype float32 --max-num-seqs 7 --seed=3"


async def test_every_engine_line_is_reemitted_as_a_structured_event(tmp_path: Path, engine_env: Path) -> None:
    with capture_logs() as logs:
        server = await managed_server(tmp_path)
        try:
            await asyncio.wait_for(supervisor_of(server).wait_ready(), GUARD_S)
        finally:
            await server.stop()
    lines = [entry["line"] for entry in logs if entry["event"] == "engine_log"]
    assert any("Initializing a V1 LLM engine" in line for line in lines)
    assert any("Starting to load model" in line for line in lines)
    assert "INFO:     Application startup complete." in lines
    events = [entry["event"] for entry in logs if entry.get("source") == "engine" and entry["event"] != "engine_log"]
    assert events == ["engine_starting", "engine_ready", "engine_stopped"]


async def test_a_crash_ends_inflight_streams_with_an_error_and_the_engine_comes_back(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        server = await managed_server(tmp_path)
        sup = supervisor_of(server)
        base = f"http://127.0.0.1:{server.port}"
        try:
            await asyncio.wait_for(sup.wait_ready(), GUARD_S)
            sup.backoff = Backoff(first_s=2.0, stable_after_s=3600)  # long enough to look at the crashed state
            first_pid, _ = pids_of(engine_env)
            async with http.post(base + "/v1/chat/completions", json={}) as stream:
                assert (await stream.content.readany()).startswith(b"data: ")
                os.kill(first_pid, signal.SIGKILL)
                body = await stream.content.read()
            last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert orjson.loads(last_event.removeprefix(b"data: "))["error"]["code"] == "upstream_disconnected"

            await wait(sup, lambda s: s.state is EngineState.CRASHED)
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 503
            async with http.post(base + "/v1/chat/completions", json={}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "engine_restarting"

            await wait(sup, lambda s: s.state is EngineState.READY)
            assert sup.pid != first_pid
            assert sup.restarts == 1
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
        finally:
            await server.stop()
    (exited,) = [entry for entry in logs if entry["event"] == "engine_exited"]
    assert exited["exit_code"] == -signal.SIGKILL
    assert exited["pid"] == first_pid
    assert any("Starting vLLM server" in line for line in exited["last_lines"])


async def test_a_crash_loop_backs_off_exponentially_and_shows_in_readyz(
    tmp_path: Path, engine_env: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    monkeypatch.setenv("FAKE_ENGINE_EXIT", "3")
    with capture_logs() as logs:
        server = await managed_server(tmp_path)
        sup = supervisor_of(server)
        try:
            await wait(sup, lambda s: s.consecutive_failures >= 5 and s.state is EngineState.CRASHED)
            async with http.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
                assert resp.status == 503
                engine = (await resp.json())["engine"]
        finally:
            await server.stop()
    assert engine["crash_loop"] is True
    assert engine["last_exit_code"] == 3
    assert "RuntimeError: fake engine failure" in engine["log_tail"]
    delays = [entry["restart_in_s"] for entry in logs if entry["event"] == "engine_exited"][:5]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4]  # doubling from first_s, capped at maximum_s


def test_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


async def test_backoff_resets_once_the_engine_stays_up(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    server = await managed_server(tmp_path)
    sup = supervisor_of(server)
    try:
        await asyncio.wait_for(sup.wait_ready(), GUARD_S)
        os.kill(sup.pid or 0, signal.SIGKILL)
        await wait(sup, lambda s: s.state is EngineState.CRASHED)
        assert sup.consecutive_failures == 1
        sup.backoff = Backoff(first_s=0.05, maximum_s=0.4, stable_after_s=0.05)
        await wait(sup, lambda s: s.state is EngineState.READY)
        await wait(sup, lambda s: s.consecutive_failures == 0)
    finally:
        await server.stop()


async def test_shutdown_drains_then_ends_the_engine_and_its_workers(
    tmp_path: Path, engine_env: Path, http: aiohttp.ClientSession
) -> None:
    server = await managed_server(tmp_path)
    sup = supervisor_of(server)
    await asyncio.wait_for(sup.wait_ready(), GUARD_S)
    engine_pid, worker_pid = pids_of(engine_env)
    await server.stop()
    assert "sigterm" in recorded(engine_env)
    assert not pid_alive(engine_pid)
    assert not pid_alive(worker_pid)
    assert not group_alive(engine_pid)
    assert sup.state is EngineState.STOPPED


async def test_an_engine_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, engine_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENGINE_IGNORE_TERM", "1")
    server = await managed_server(tmp_path, engine_grace=0.2)
    await asyncio.wait_for(supervisor_of(server).wait_ready(), GUARD_S)
    engine_pid, worker_pid = pids_of(engine_env)
    await server.stop()
    assert "sigterm" in recorded(engine_env)
    assert not pid_alive(engine_pid)
    assert not pid_alive(worker_pid)


async def test_no_engine_outlives_a_gateway_killed_with_sigkill(tmp_path: Path, engine_env: Path) -> None:
    model = tmp_path / "tiny-model"
    model.mkdir()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flushgate", "serve", "--model", str(model), "--port", "0", "--log-format", "json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert gateway.stdout is not None
    try:
        while True:
            event = orjson.loads(await asyncio.wait_for(gateway.stdout.readline(), GUARD_S))
            if event["event"] == "engine_ready":
                break
    finally:
        gateway.kill()
        await gateway.wait()
    engine_pid, worker_pid = pids_of(engine_env)
    deadline = asyncio.get_running_loop().time() + 2 * GUARD_S
    while (pid_alive(engine_pid) or pid_alive(worker_pid)) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # the kernel's parent-death signal has no event to wait on
    assert not pid_alive(engine_pid)
    assert not pid_alive(worker_pid)
