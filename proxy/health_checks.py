"""Active health: every engine is asked for its readiness on a fixed beat, independent of traffic.

Passive ejection (``proxy/pool.py``) only learns from requests that fail; this is what notices an engine that
came back, and one that went bad while nobody was sending to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from flushgate.proxy.pool import EngineMember, EnginePool
from flushgate.proxy.upstream import Readiness


class HealthChecker:
    def __init__(
        self, pool: EnginePool, session: aiohttp.ClientSession, *, interval_s: float, timeout_s: float, log: Any
    ) -> None:
        self.pool = pool
        self.session = session
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.pool.active_checks = True
        self._task = asyncio.create_task(self._run(), name="engine-health-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:  # engines start out assumed healthy: the first check is one interval in
            await asyncio.sleep(self.interval_s)
            await self.check_once()

    async def check_once(self) -> None:
        """One round: every current member, concurrently."""
        members = list(self.pool.members)
        verdicts = await asyncio.gather(*(self._check(m) for m in members))
        for member, verdict in zip(members, verdicts, strict=True):
            was_healthy = member.healthy
            if self.pool.checked(member, verdict):
                self.log.info("engine_readmitted", engine=member.url)
            elif was_healthy and not verdict.ready:
                self.log.warning("engine_unhealthy", engine=member.url, detail=verdict.detail)

    async def _check(self, member: EngineMember) -> Readiness:
        try:
            return await asyncio.wait_for(member.backend.readiness(self.session), self.timeout_s)
        except TimeoutError:
            return Readiness(False, {"upstream": member.url, "error": f"no answer within {self.timeout_s:g} s"})
