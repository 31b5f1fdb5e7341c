"""A fake engine with a known token cadence, and hops with planted faults, for the doctor's tests.

The engine emits one event per token, a fixed step apart (each step waits after the previous write, so a busy
machine stretches the stream but never bunches it). Each hop is a small aiohttp server that forwards to an
upstream and does one thing wrong, the way real proxies do.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

Relay = Callable[[web.Request, aiohttp.ClientResponse, web.StreamResponse], Awaitable[None]]

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", " again", " and"]


@dataclass
class CadenceEngine:
    """OpenAI SSE (``/v1/chat/completions``) and Ollama NDJSON (``/api/chat``) at one token per ``step_s``.

    Like vLLM, it sends the response headers at once and the first event (the role) with the first token, after
    ``prefill_s``. ``pause_after``/``pause_s``: one long silence mid-answer, as a thinking or preempted request has.
    """

    tokens: int = 32
    step_s: float = 0.02
    prefill_s: float = 0.0
    pause_after: int | None = None
    pause_s: float = 0.0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/api/chat", self._ollama)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "cadence-model", "object": "model"}]})

    def _tokens(self, max_tokens: int) -> list[str]:
        return [WORDS[i % len(WORDS)] for i in range(min(self.tokens, max_tokens))]

    async def _step(self, index: int) -> None:
        await asyncio.sleep(self.step_s)
        if self.pause_after is not None and index == self.pause_after:
            await asyncio.sleep(self.pause_s)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)

        def event(delta: dict[str, str], finish: str | None = None) -> bytes:
            chunk = {
                "id": "chatcmpl-cadence",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        await asyncio.sleep(self.prefill_s)
        for index, word in enumerate(self._tokens(body.get("max_tokens") or self.tokens)):
            if index:
                await self._step(index)
            else:
                await response.write(event({"role": "assistant", "content": ""}))
            await response.write(event({"content": word}))
        await response.write(event({}, "length") + b"data: [DONE]\n\n")
        return response

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        limit = (body.get("options") or {}).get("num_predict") or self.tokens
        await asyncio.sleep(self.prefill_s)
        for index, word in enumerate(self._tokens(limit)):
            if index:
                await self._step(index)
            line = {"model": body.get("model"), "message": {"role": "assistant", "content": word}, "done": False}
            await response.write(orjson.dumps(line) + b"\n")
        last = {"model": body.get("model"), "message": {"role": "assistant", "content": ""}, "done": True}
        await response.write(orjson.dumps(last) + b"\n")
        return response


@dataclass
class Hop:
    """Forwards every request to ``upstream`` and hands the answer to ``relay``, which decides what goes wrong."""

    upstream: str
    relay: Relay
    extra_headers: dict[str, str] = field(default_factory=dict)
    delay_request_s: float = 0.0  # before forwarding, as a hop doing slow auth or a cold connection does
    status: int | None = None  # answer this instead of forwarding
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.status is not None:
            return web.json_response({"error": {"message": "planted failure", "code": "planted"}}, status=self.status)
        assert self._session is not None
        data = await request.read()
        if self.delay_request_s:
            await asyncio.sleep(self.delay_request_s)
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=data, headers=headers
        ) as up:
            response = web.StreamResponse(
                status=up.status, headers={"Content-Type": up.headers["Content-Type"], **self.extra_headers}
            )
            await response.prepare(request)
            await self.relay(request, up, response)
            return response


async def pass_through(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
    async for chunk in up.content.iter_any():
        await out.write(chunk)


async def hold_all(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
    """Buffers the whole answer, as a proxy with response buffering and a large enough buffer does."""
    await out.write(await up.read())


def fixed_blocks(size: int) -> Relay:
    """Releases fixed-size blocks, cutting events in two, as a proxy buffer of ``size`` bytes does."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        held = b""
        async for chunk in up.content.iter_any():
            held += chunk
            while len(held) >= size:
                await out.write(held[:size])
                held = held[size:]
        await out.write(held)

    return relay


def hold_first(seconds: float) -> Relay:
    """Holds everything for the first ``seconds`` of the answer, then passes it on."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        held = b""
        release = asyncio.get_running_loop().time() + seconds
        async for chunk in up.content.iter_any():
            if asyncio.get_running_loop().time() < release:
                held += chunk
                continue
            await out.write(held + chunk)
            held = b""
        await out.write(held)

    return relay


def flush_every(period_s: float) -> Relay:
    """Collects what arrives and writes it out on a clock, as a batching hop does."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        held: list[bytes] = []
        finished = asyncio.Event()

        async def collect() -> None:
            async for chunk in up.content.iter_any():
                held.append(chunk)
            finished.set()

        reader = asyncio.create_task(collect())
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), period_s)
            if held:
                batch = b"".join(held)
                held.clear()
                await out.write(batch)
        await reader

    return relay


def gzip_relay(flush_each: bool) -> Relay:
    """gzip on the stream: with ``flush_each`` every read is flushed (compressed but on time), else all at the end."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        async for chunk in up.content.iter_any():
            packed = packer.compress(chunk)
            if flush_each:
                packed += packer.flush(zlib.Z_SYNC_FLUSH)
            if packed:
                await out.write(packed)
        await out.write(packer.flush())

    return relay


def throttle(bytes_per_s: float, slice_size: int = 32) -> Relay:
    """Passes bytes on at a fixed rate below what the engine produces: a hop that cannot keep up."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        async for chunk in up.content.iter_any():
            for start in range(0, len(chunk), slice_size):
                await out.write(chunk[start : start + slice_size])
                await asyncio.sleep(slice_size / bytes_per_s)

    return relay


def idle_cut(idle_s: float) -> Relay:
    """Drops the connection when upstream has been silent for ``idle_s``, as a proxy's read timeout does."""

    async def relay(request: web.Request, up: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        while True:
            try:
                chunk = await asyncio.wait_for(up.content.readany(), idle_s)
            except TimeoutError:
                assert request.transport is not None
                request.transport.close()
                return
            if not chunk:
                return
            await out.write(chunk)

    return relay
