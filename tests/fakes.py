"""A scriptable OpenAI-shaped upstream: each test decides exactly what the "engine" sends and when."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SeenRequest:
    method: str
    raw_path: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class FakeUpstream:
    """An aiohttp server whose behaviour is the ``handler`` a test assigns.

    ``peer_gone`` is set when a handler is cancelled because the gateway closed the connection, which is how a
    real vLLM learns that a request was aborted.
    """

    handler: Handler | None = None
    seen: list[SeenRequest] = field(default_factory=list)
    peer_gone: asyncio.Event = field(default_factory=asyncio.Event)
    requests_started: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0  # 0: any free port; the bound one after start()
    host: str = "127.0.0.1"
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests_started.set()
        try:
            if self.handler is None:
                return await record_and_echo(self, request)
            return await self.handler(request)
        except asyncio.CancelledError:
            self.peer_gone.set()
            raise


async def record_and_echo(fake: FakeUpstream, request: web.Request) -> web.Response:
    """Default behaviour: remember the request and answer with a small JSON body."""
    body = await request.read()
    headers: dict[str, list[str]] = {}
    for key, value in request.headers.items():
        headers.setdefault(key.lower(), []).append(value)
    fake.seen.append(SeenRequest(request.method, request.raw_path, headers, body))
    return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")


def sse_chunk(content: str, index: int = 0, model: str = "fake-model") -> bytes:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": index, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def start_stream(request: web.Request, content_type: str = "text/event-stream") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    return response
