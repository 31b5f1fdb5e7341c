"""Several scriptable fake engines behind one gateway, for routing and failover tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from flushgate.config import Config, Routing, Timeouts
from flushgate.server import Server
from tests.fakes import FakeUpstream, ScriptedEngine, start_stream

GUARD_S = 10
Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def answer_event(engine: int) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": f"from {engine}"}}]}) + b"\n\n"


async def complete_answer(request: web.Request, engine: int) -> web.StreamResponse:
    response = await start_stream(request)
    await response.write(answer_event(engine))
    await response.write(b"data: [DONE]\n\n")
    return response


@dataclass
class EngineFarm:
    """Fake engines that share one script: the n-th request to arrive, at whichever engine, gets the n-th
    behaviour (then complete answers). ``/health`` answers 200 or 503 as ``healthy`` says; ``/v1/models`` and
    ``/tokenize`` (what the Ollama routes ask first) are answered as one model, ``fake-model``, by every engine."""

    fakes: list[FakeUpstream]
    arrivals: list[tuple[int, bytes]] = field(default_factory=list)  # (engine index, body), in arrival order
    script: list[Behaviour] = field(default_factory=list)
    healthy: list[bool] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    catalog: ScriptedEngine = field(default_factory=ScriptedEngine)

    def __post_init__(self) -> None:
        self.healthy = [True] * len(self.fakes)
        for index, fake in enumerate(self.fakes):
            fake.handler = self._handler_for(index)

    @property
    def urls(self) -> list[str]:
        return [fake.url for fake in self.fakes]

    def engine_of(self, url: str) -> int:
        return self.urls.index(url)

    def served_by(self, index: int) -> int:
        return sum(1 for engine, _ in self.arrivals if engine == index)

    async def wait_arrivals(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.arrivals) >= count), GUARD_S)

    def _handler_for(self, index: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            # Checks and catalog answers close their connection: a scripted request then comes on a new one, so
            # its hang-up is the engine failing, not an idle close crossing it (that is sent again, unheld).
            if request.path == "/health":
                checked = web.Response(status=200 if self.healthy[index] else 503)
                checked.force_close()
                return checked
            if request.path in ("/v1/models", "/tokenize"):
                listed = await self.catalog(request)
                listed.force_close()
                return listed
            body = await request.read()
            behaviour = self.script.pop(0) if self.script else complete_answer
            async with self.arrived:
                self.arrivals.append((index, body))
                self.arrived.notify_all()
            return await behaviour(request, index)

        return handler


async def start_farm(n: int) -> EngineFarm:
    fakes = [FakeUpstream() for _ in range(n)]
    for fake in fakes:
        await fake.start()
    return EngineFarm(fakes)


async def stop_farm(farm: EngineFarm) -> None:
    for fake in farm.fakes:
        await fake.stop()


async def start_gateway(urls: Sequence[str], **routing: Any) -> Server:
    """A gateway over ``urls``; active checks only when a test asks (then it drives them itself)."""
    settings: dict[str, Any] = {"health_interval": 0.0, **routing}
    server = Server(Config(upstream=tuple(urls), port=0, routing=Routing(**settings), timeouts=Timeouts(drain=5)))
    await server.start()
    return server


def records(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "request"]


class ScriptedResolver(AbstractResolver):
    """Answers A lookups from ``records``; a name it does not hold is NXDOMAIN, ``failure`` any other error."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failure: OSError | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.failure is not None:
            raise self.failure
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0)
            for ip in self.records[host]
        ]

    async def close(self) -> None:
        pass
