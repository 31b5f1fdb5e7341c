from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from flushgate.config import Config, Timeouts
from flushgate.server import Server
from tests.fakes import FakeUpstream
from tests.managed import FAKE_VLLM


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def timeouts() -> Timeouts:
    return Timeouts(connect=5.0, idle=600.0, drain=5.0)


@pytest.fixture
async def gateway(fake: FakeUpstream, timeouts: Timeouts) -> AsyncIterator[Server]:
    server = Server(Config(upstream=fake.url, port=0, timeouts=timeouts))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def gateway_url(gateway: Server) -> str:
    return f"http://127.0.0.1:{gateway.port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows bytes as they arrived: no decompression, no connection cap."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session


@pytest.fixture
def engine_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in vLLM first on the engine's import path; returns the file it records events in."""
    monkeypatch.setenv("PYTHONPATH", f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    record = tmp_path / "engine-events"
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    return record


@pytest.fixture
async def connection(gateway: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection to the gateway, closed after the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    yield reader, writer
    writer.close()
