"""Whatever the chunk boundaries, the client receives exactly the bytes upstream sent."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flushgate.config import Config
from flushgate.server import Server
from tests.fakes import FakeUpstream

CONTENT_TYPES = ["text/event-stream", "application/x-ndjson", "application/json", "application/octet-stream"]


class Stack:
    """A fake upstream and a gateway on one private event loop, shared by all examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake = FakeUpstream()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        await self.fake.start()
        self.gateway = Server(Config(upstream=self.fake.url, port=0))
        await self.gateway.start()
        self.session = aiohttp.ClientSession(auto_decompress=False)

    async def _stop(self) -> None:
        await self.session.close()
        await self.gateway.stop()
        await self.fake.stop()

    def close(self) -> None:
        self.loop.run_until_complete(self._stop())
        self.loop.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# Text that is mostly multi-byte UTF-8 (accents, CJK, emoji), so cuts land inside characters.
texts = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x1FAFF, codec="utf-8"),
    min_size=1,
    max_size=400,
)
bodies = st.one_of(texts.map(lambda t: t.encode("utf-8")), st.binary(min_size=1, max_size=4000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies,
    cuts=st.lists(st.integers(min_value=0), max_size=40),
    content_type=st.sampled_from(CONTENT_TYPES),
)
def test_client_receives_exactly_the_upstream_bytes(
    stack: Stack, body: bytes, cuts: list[int], content_type: str
) -> None:
    pieces = split(body, cuts)
    assert b"".join(pieces) == body

    async def send_in_pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        return response

    async def roundtrip() -> tuple[int, bytes]:
        stack.fake.handler = send_in_pieces
        url = f"http://127.0.0.1:{stack.gateway.port}/v1/chat/completions"
        async with stack.session.post(url, data=b"{}") as resp:
            return resp.status, await resp.read()

    status, received = stack.loop.run_until_complete(roundtrip())
    assert status == 200
    assert received == body
