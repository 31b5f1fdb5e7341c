"""A gateway managing the stand-in vLLM of tests/fake_vllm: fixtures and helpers shared by engine tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flushgate.config import Config, Timeouts
from flushgate.engine.supervisor import Backoff, EngineSupervisor
from flushgate.server import Server

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
GUARD_S = 30


def recorded(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def pids_of(path: Path) -> tuple[int, int]:
    lines = recorded(path)
    server = int(next(line for line in lines if line.startswith("server ")).split()[1])
    worker = int(next(line for line in lines if line.startswith("worker ")).split()[1])
    return server, worker


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def managed_server(tmp_path: Path, **config: object) -> Server:
    model = tmp_path / "tiny-model"
    model.mkdir(exist_ok=True)
    settings: dict[str, object] = {"model": str(model), "port": 0, "log_format": "json", "timeouts": Timeouts(drain=5)}
    settings.update(config)
    server = Server(Config(**settings))  # type: ignore[arg-type]
    assert server.supervisor is None
    await server.start()
    sup = server.supervisor
    assert sup is not None
    sup.backoff = Backoff(first_s=0.05, maximum_s=0.4, stable_after_s=3600)
    sup.poll_interval_s = 0.02
    return server


def supervisor_of(server: Server) -> EngineSupervisor:
    assert server.supervisor is not None
    return server.supervisor


async def wait(sup: EngineSupervisor, condition: object) -> None:
    await asyncio.wait_for(sup.wait_until(condition), GUARD_S)  # type: ignore[arg-type]
