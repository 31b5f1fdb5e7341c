"""The client's request body, read ahead so it can be looked at (affinity) and sent again (failover).

With one engine the body streams straight through; with several it is read first, up to a cap. Chat requests
are small, and the engine cannot start before the whole body is there anyway, so reading it first costs no
time to first token; a body over the cap streams on from where the read stopped, and can then be sent only once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

READ_AHEAD_CAP = 8 << 20  # bytes; larger bodies (e.g. several images inline) stream through without a copy


class OutgoingBody:
    def __init__(self, head: bytes, rest: AsyncIterator[bytes] | None) -> None:
        self.head = head
        self._rest = rest
        self._started = False

    @property
    def complete(self) -> bool:
        """The whole body was read ahead: it can be parsed and sent any number of times."""
        return self._rest is None

    @property
    def replayable(self) -> bool:
        return self._rest is None or not self._started

    def payload(self) -> bytes | AsyncIterator[bytes]:
        if self._rest is None:
            return self.head
        return self._stream(self._rest)

    async def _stream(self, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self._started = True
        yield self.head
        async for chunk in rest:
            yield chunk


class BodyStalled(Exception):
    """A request body paused for longer than the gateway waits (nginx's client_body_timeout); the message is what
    every route tells the client, with a 408."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the request body stopped arriving: {reason}")

    @classmethod
    def after(cls, gap_s: float) -> BodyStalled:
        return cls(f"no part of it came for {gap_s:g} s")


async def arriving(chunks: AsyncIterator[bytes], gap_s: float | None) -> AsyncIterator[bytes]:
    """The body's parts as they come; ``BodyStalled`` when the next one takes longer than ``gap_s``."""
    while True:
        try:
            async with asyncio.timeout(gap_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise BodyStalled.after(gap_s or 0) from exc
        yield chunk


async def read_ahead(chunks: AsyncIterator[bytes], cap: int | None = None) -> OutgoingBody:
    cap = READ_AHEAD_CAP if cap is None else cap
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > cap:
            return OutgoingBody(b"".join(parts), chunks)
    return OutgoingBody(b"".join(parts), None)
