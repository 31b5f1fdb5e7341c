"""The client's side of one pass-through exchange: what the relay needs from whichever server took the request.

Two servers take requests: aiohttp's (every route) and the gateway's own protocol for the hot route
(proxy/front.py). The relay in proxy/passthrough.py reads the request and writes the answer through this
interface only, so both run the same forwarding code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from flushgate.proxy.headers import AnswerHead, RawHeaders

# Bytes the gateway holds for a client whose socket is full before it stops reading the engine (asyncio's and
# uvloop's default is 64 KiB). Tokens held here wait behind the ones before them, as in a socket buffer, and
# the engine does not feel the slow reader until they are gone; nginx holds one 4 or 8 KiB buffer
# (``proxy_buffer_size``). The benchmark's back-to-back stream: docs/bench/README.md.
CLIENT_WRITE_HIGH = 4096


async def hold_little_for_the_client(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's ``on_response_prepare``: the front's mark also on a connection aiohttp's server accepted itself
    (``--no-own-server``), whatever the route (the pass-through, Ollama's, the gateway's own)."""
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH)


class Opened(NamedTuple):
    """The client's answer, opened: where its body goes and how."""

    transport: asyncio.Transport
    flow: Any  # the protocol whose ``writing_paused`` says the transport's buffer is full
    chunked: bool  # body bytes must be framed as HTTP chunks by the writer
    head: bytes = b""  # the answer's head, when it is left to go out with the first body bytes (one write)
    ending: bytes = b""  # what closes the body (the last chunk), when the writer may send it with the last bytes
    ended: Callable[[], None] | None = None  # told once the writer has sent ``ending``


class ClientSide(Protocol):
    opens_at_once: bool  # ``open_now`` can send the answer's head from a read callback

    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str:
        """The request target as sent: path and query, still percent-encoded."""
        ...

    @property
    def path(self) -> str:
        """The decoded path, for the record."""
        ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def raw_headers(self) -> RawHeaders:
        """The request's header fields as their bytes, for forwarding (proxy/headers.py)."""
        ...

    def header(self, name: bytes) -> str | None:
        """The first value of the request header ``name`` (lower case)."""
        ...

    @property
    def remote(self) -> str | None: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    def body_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, for a body not read before the exchange began."""
        ...

    async def open(self, status: int, reason: str, head: AnswerHead) -> Opened:
        """Open the answer: its head is sent, or left in ``Opened.head`` for the writer's first write."""
        ...

    def open_now(self, status: int, reason: str, head: AnswerHead) -> Opened:
        """``open`` without waiting, from the engine connection's read callback; only where ``opens_at_once``."""
        ...

    async def drain(self) -> None:
        """Wait until the client's socket takes bytes again."""
        ...

    async def write(self, data: bytes) -> None:
        """Body bytes outside the hot path (a closing event or comment), framed as the answer requires."""
        ...

    def cut(self) -> None:
        """Close the connection with the answer unfinished, so the client sees a truncated response."""
        ...


class AiohttpClient:
    """An aiohttp request and the streamed response that answers it."""

    opens_at_once = False  # aiohttp prepares a response in a coroutine

    __slots__ = ("_writer", "body_exists", "content_length", "headers", "method", "path", "raw_headers", "remote",
                 "request", "response", "target")  # fmt: skip

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.target = request.raw_path
        self.path = request.path
        self.headers: CIMultiDict[str] | CIMultiDictProxy[str] = request.headers
        self.raw_headers: RawHeaders = request.raw_headers
        self.remote = request.remote
        self.content_length = request.content_length
        self.body_exists = request.body_exists
        self.response: web.StreamResponse | None = None
        self._writer: AbstractStreamWriter | None = None

    def header(self, name: bytes) -> str | None:
        return self.headers.get(name.decode())

    def body_chunks(self) -> AsyncIterator[bytes]:
        return self.request.content.iter_any()

    def handler_result(self, answer: web.Response | None) -> web.StreamResponse:
        """What the aiohttp handler returns: the response to send, or the one already streamed (None)."""
        if answer is not None:
            return answer
        assert self.response is not None
        return self.response

    async def open(self, status: int, reason: str, head: AnswerHead) -> Opened:
        response = self.response = web.StreamResponse(status=status, reason=reason or None, headers=head.multidict())
        writer = self._writer = await response.prepare(self.request)
        transport = self.request.transport
        if writer is None or transport is None:
            raise ConnectionResetError("the client's connection is closed")
        return Opened(transport, self.request.protocol, response.headers.get("Transfer-Encoding") == "chunked")

    def open_now(self, status: int, reason: str, head: AnswerHead) -> Opened:
        raise RuntimeError("aiohttp's response is prepared in a coroutine: use open")

    async def drain(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    def cut(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()
