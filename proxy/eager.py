"""Starting a coroutine at once, in the callback that has its input, and handing it to a task only once it waits.

A task's first step runs when the event loop gets to it: after every other callback of the current turn, and
under a burst of streams a turn is long (each ready engine socket is read and its chunk written). A request read
by the front would wait that long before it is even sent to the engine. Started here, it is sent from the read
callback that completed it. (Python 3.12's ``asyncio.eager_task_factory`` does this for every task; this is the
same for one coroutine, on 3.11.)

What the eager part may do: anything but what needs ``asyncio.current_task()`` (``asyncio.timeout`` and
aiohttp's client timeouts do), as there is no task yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class _Resumed(Coroutine[Any, Any, T]):
    """A coroutine already run up to its first wait, for a task to finish: the task's first step is handed what
    the coroutine waits on; a cancel that comes before that step is thrown in where the coroutine waits."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self._coro = coro
        self._first: list[Any] | None = [waiting]

    def send(self, value: Any) -> Any:
        first, self._first = self._first, None
        if first is not None:
            return first[0]
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("handed to a task, not awaited")


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now until it first waits, then in a task; None if it finished without waiting. It handles
    its own errors: one that escapes its eager part goes to the loop's exception handler, as a task's would."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    except Exception as exc:
        loop.call_exception_handler({"message": "a coroutine started eagerly failed", "exception": exc})
        return None
    return loop.create_task(_Resumed(coro, waiting))
