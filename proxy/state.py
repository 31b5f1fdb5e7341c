"""The gateway's shared state, owned by the application object rather than by module globals."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from flushgate.config import Timeouts
from flushgate.proxy.engine_http import EngineConnections
from flushgate.proxy.ollama.settings import OllamaSettings
from flushgate.proxy.router import Router
from flushgate.proxy.upstream import Backend, Unavailable
from flushgate.recorder import Recorder


@dataclass(slots=True)
class Gateway:
    backend: Backend
    session: aiohttp.ClientSession
    timeouts: Timeouts
    log: Any
    recorder: Recorder
    hop_timing: bool = True  # per-chunk timestamps for the record and metrics
    timing_summary: bool = False  # end every event stream with a ': flushgate-timing {...}' comment
    log_content: bool = False  # prompts and completions in the record
    max_body_bytes: int = 0  # a streamed (chunked) request body is cut off above this; 0: no limit
    body_timeout: float | None = None  # the longest pause in a streamed request body; None: no limit
    draining: bool = False
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    ollama: OllamaSettings = field(default_factory=OllamaSettings)
    router: Router | None = None  # picks the engine per request; None: one made for ``backend`` alone
    # The pass-through's own connections to the engines (proxy/engine_http.py); ``session`` serves the rest.
    engines: EngineConnections = field(init=False)

    def __post_init__(self) -> None:
        self.engines = EngineConnections(self.timeouts.engine_keepalive)
        self._idle.set()
        if self.router is None:
            self.router = Router.of_one(self.backend)

    def refusal(self) -> Unavailable | None:
        if self.draining:
            return Unavailable("the gateway is shutting down; retry on another instance", "draining", 1)
        return self.backend.unavailable()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if some still were after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


GATEWAY = web.AppKey("gateway", Gateway)
