"""The managed engine as the gateway sees it (the ``Backend`` protocol of ``proxy/upstream.py``)."""

from __future__ import annotations

import math
import time

import aiohttp

from flushgate.engine.supervisor import EngineState, EngineSupervisor
from flushgate.proxy.upstream import Readiness, Unavailable


class EngineBackend:
    def __init__(self, supervisor: EngineSupervisor) -> None:
        self.supervisor = supervisor

    @property
    def base_url(self) -> str:
        return self.supervisor.base_url

    def unavailable(self) -> Unavailable | None:
        sup = self.supervisor
        state = sup.state
        if state is EngineState.READY:
            return None
        now = time.monotonic()
        if state is EngineState.STARTING:
            elapsed = now - sup.started_at
            return Unavailable(
                f"the engine is loading the model ({sup.phase.value}, {elapsed:.0f} s so far); retry shortly",
                "engine_loading",
                5,
            )
        if state is EngineState.CRASHED:
            wait = max(1, math.ceil(sup.next_start_at - now))
            return Unavailable(
                f"the engine exited with code {sup.last_exit_code} and restarts in {wait} s "
                f"({sup.consecutive_failures} failure(s) in a row)",
                "engine_restarting",
                wait + 5,
            )
        return Unavailable("the engine is shutting down", "engine_stopping", 1)

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness:
        sup = self.supervisor
        ready = sup.state is EngineState.READY and await sup.probe(session)
        return Readiness(ready, {"engine": sup.status()})
