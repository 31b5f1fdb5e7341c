"""Request starts spread over turns of the event loop, so running streams' chunks are not held behind them.

Starting a request (its head parsed, the guards, the engine request written) costs the gateway's core about 140
µs. When many clients send at once (64 streams ending and starting again together), starting them all in the
turn that read them holds every chunk that arrived meanwhile for the whole batch: 16 starts are over 2 ms. Between
two turns the loop polls its sockets and writes the chunks that came, so the others wait, in the order they came,
for the next turns. A turn starts at least ``per_turn`` of them, and more while its starts have taken less time
than the loop spent on everything else since this turn's callback was queued: starts at most double the wait of
a chunk that comes meanwhile, and under a burst among many streams, where turns are long, they are not starved
by those streams' chunks (a fixed four per turn delayed the benchmark's 256-stream burst: docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

STARTS_PER_TURN = 4


class Startable(Protocol):
    def start_if_still_wanted(self) -> None:
        """Start the request read earlier, unless the connection has gone since."""


class StartPacer:
    __slots__ = ("_clock", "_loop", "_per_turn", "_queued_at", "_scheduled", "_started", "_waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        per_turn: int = STARTS_PER_TURN,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._loop = loop
        self._per_turn = per_turn
        self._clock = clock
        self._started = 0  # starts in this turn
        self._scheduled = False  # the next turn's callback is queued
        self._queued_at = 0.0  # when it was: the loop's other work since then is the next turn's time for starts
        self._waiting: deque[Startable] = deque()

    def admit(self, request: Startable) -> bool:
        """True: start it now. False: it waits and ``start_if_still_wanted`` is called in a later turn."""
        if not self._scheduled:
            self._schedule()
        if self._started < self._per_turn and not self._waiting:
            self._started += 1
            return True
        self._waiting.append(request)
        return False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _schedule(self) -> None:
        self._scheduled = True
        self._queued_at = self._clock()
        self._loop.call_soon(self._next_turn)  # runs after this turn's callbacks: the count starts again

    def _next_turn(self) -> None:
        clock = self._clock
        began = clock()
        until = began + (began - self._queued_at)
        self._scheduled = False
        self._started = 0
        waiting = self._waiting
        while waiting and (self._started < self._per_turn or clock() < until):
            self._started += 1
            waiting.popleft().start_if_still_wanted()
        if self._started:  # a callback queued now runs after the loop has polled its sockets again
            self._schedule()
