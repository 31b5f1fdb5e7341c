"""Waiting on the event loop itself, not on time: what a test waits for is seen within a few turns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def turns_until(done: Callable[[], object], turns: int = 10_000) -> None:
    """Let the loop turn until ``done()`` (a close or a connect is seen within a few turns); the caller asserts."""
    for _ in range(turns):
        if done():
            return
        await asyncio.sleep(0)
