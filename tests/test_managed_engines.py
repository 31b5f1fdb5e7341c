"""Several managed engines: where each runs, and one restarting while the others serve (stand-in vLLM)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from flushgate.config import Config, Routing, Timeouts
from flushgate.engine.placement import Placement, place_engines, visible_gpus
from flushgate.engine.supervisor import Backoff, EngineState
from flushgate.server import Server
from tests.managed import GUARD_S, wait
from tests.several_engines import records


def test_engines_are_dealt_round_the_gpus_one_each() -> None:
    placements = place_engines(4, ("0", "1", "2", "3"), ())
    assert [p.gpu for p in placements] == ["0", "1", "2", "3"]
    assert all(p.args == () for p in placements)


def test_engines_sharing_a_gpu_split_the_memory_fraction_between_them() -> None:
    placements = place_engines(4, ("0", "1"), ("--gpu-memory-utilization", "0.90"))
    assert [p.gpu for p in placements] == ["0", "1", "0", "1"]
    assert all(p.args == ("--gpu-memory-utilization", "0.45") for p in placements)
    (alone, *_) = place_engines(3, ("7",), ("--gpu-memory-utilization=0.6",))
    assert alone.args == ("--gpu-memory-utilization", "0.2")
    assert place_engines(2, ("0",), ())[0].args == ("--gpu-memory-utilization", "0.45")  # vLLM's default 0.9


def test_tensor_parallel_engines_get_a_group_of_gpus_each() -> None:
    placements = place_engines(2, ("0", "1", "2", "3"), ("--tensor-parallel-size", "2"))
    assert [p.gpu for p in placements] == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="needs 4 GPUs per engine; 2 visible"):
        place_engines(2, ("0", "1"), ("-tp", "4"))


def test_one_engine_and_cpu_engines_are_left_as_they_are() -> None:
    assert place_engines(1, ("0", "1"), ()) == [Placement(0)]
    assert place_engines(3, (), ()) == [Placement(0), Placement(1), Placement(2)]


def test_visible_gpus_come_from_cuda_visible_devices_else_the_driver(tmp_path: Path) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}, tmp_path / "none") == ("2", "3")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, tmp_path / "none") == ()
    driver = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (driver / bus).mkdir(parents=True)
    assert visible_gpus({}, driver) == ("0", "1")
    assert visible_gpus({}, tmp_path / "none") == ()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def start_managed(tmp_path: Path, engines: int, **config: object) -> Server:
    model = tmp_path / "tiny-model"
    model.mkdir(exist_ok=True)
    server = Server(
        Config(
            model=str(model),
            engines=engines,
            port=0,
            log_format="json",
            timeouts=Timeouts(drain=5),
            routing=Routing(health_interval=0),
            **config,  # type: ignore[arg-type]
        )
    )
    await server.start()
    for sup in server.supervisors:
        sup.backoff = Backoff(first_s=0.05, maximum_s=0.4, stable_after_s=3600)
        sup.poll_interval_s = 0.02
    return server


@pytest.fixture
async def two_engines(tmp_path: Path, engine_env: Path) -> AsyncIterator[Server]:
    server = await start_managed(tmp_path, 2, gpus=("0", "1"))
    await asyncio.wait_for(asyncio.gather(*(s.wait_ready() for s in server.supervisors)), GUARD_S)
    yield server
    await server.stop()


async def served_by(http: aiohttp.ClientSession, server: Server, requests: int) -> list[str]:
    with capture_logs() as logs:
        for _ in range(requests):
            url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
            async with http.post(url, json={"fake_tokens": 2}) as resp:
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert server.gateway is not None
        await server.gateway.recorder.flush()
    return sorted(record["engine"] for record in records(logs))


async def test_each_managed_engine_gets_its_own_gpu_and_a_share_of_the_requests(
    two_engines: Server, http: aiohttp.ClientSession
) -> None:
    first, second = two_engines.supervisors
    assert first.pid is not None
    assert second.pid is not None
    assert environ_of(first.pid)["CUDA_VISIBLE_DEVICES"] == "0"
    assert environ_of(second.pid)["CUDA_VISIBLE_DEVICES"] == "1"
    assert first.base_url != second.base_url
    assert await served_by(http, two_engines, 4) == sorted([first.base_url] * 2 + [second.base_url] * 2)
    async with http.get(f"http://127.0.0.1:{two_engines.port}/readyz") as ready:
        assert ready.status == 200
        engines = (await ready.json())["engines"]
    assert [e["engine"]["state"] for e in engines] == ["ready", "ready"]


async def test_engines_sharing_one_gpu_are_started_with_a_share_of_its_memory(tmp_path: Path, engine_env: Path) -> None:
    server = await start_managed(tmp_path, 3, gpus=("0",))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_ready() for s in server.supervisors)), GUARD_S)
        for sup in server.supervisors:
            assert sup.pid is not None
            assert environ_of(sup.pid)["CUDA_VISIBLE_DEVICES"] == "0"
            argv = argv_of(sup.pid)
            assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"
    finally:
        await server.stop()


async def test_while_one_managed_engine_restarts_the_other_serves_every_request(
    two_engines: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    crashed, survivor = two_engines.supervisors
    assert crashed.pid is not None
    gate = tmp_path / "restart-gate"  # the restarted engine stays loading until this file exists
    crashed.spec.env["FAKE_ENGINE_GATE"] = str(gate)
    os.killpg(crashed.pid, signal.SIGKILL)
    await wait(crashed, lambda s: s.state is EngineState.STARTING and s.restarts == 1)
    assert await served_by(http, two_engines, 4) == [survivor.base_url] * 4
    async with http.get(f"http://127.0.0.1:{two_engines.port}/readyz") as ready:
        assert ready.status == 200
        states = [e["engine"]["state"] for e in (await ready.json())["engines"]]
    assert states == ["starting", "ready"]
    gate.touch()
    await asyncio.wait_for(crashed.wait_ready(), GUARD_S)
    assert set(await served_by(http, two_engines, 4)) == {crashed.base_url, survivor.base_url}
    async with http.get(f"http://127.0.0.1:{two_engines.port}/metrics") as resp:
        assert "flushgate_engine_restarts_total 1.0" in await resp.text()
