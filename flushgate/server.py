"""Lifecycle: bind the gateway, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web

from flushgate import __version__
from flushgate.config import Config
from flushgate.logs import get_logger
from flushgate.proxy.app import build_app
from flushgate.proxy.state import Gateway
from flushgate.proxy.upstream import AttachedBackend, Backend, open_session


class Server:
    """Owns the listening socket, the upstream session and the drain on shutdown."""

    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        self.config = config.validate()
        self.log: Any = get_logger("gateway")
        self._backend = backend
        self._runner: web.AppRunner | None = None
        self.gateway: Gateway | None = None
        self.port: int = config.port

    async def start(self) -> None:
        config = self.config
        backend = self._backend
        if backend is None:
            assert config.upstream_base is not None
            backend = AttachedBackend(config.upstream_base)
        self.gateway = Gateway(
            backend=backend, session=open_session(config.timeouts), timeouts=config.timeouts, log=self.log
        )
        # handler_cancellation: a client that goes away cancels its handler, which closes the upstream request,
        # even while a non-streamed request is still waiting for the engine's answer.
        self._runner = web.AppRunner(
            build_app(self.gateway), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.port, backlog=1024)
        await site.start()
        self.port = site.port
        self.log.info(
            "listening",
            version=__version__,
            url=f"http://{config.host}:{self.port}",
            upstream=backend.base_url,
            idle_timeout_s=config.timeouts.idle,
        )

    def begin_drain(self) -> None:
        """From now on readiness fails and new requests get 503; in-flight ones carry on."""
        if self.gateway is not None:
            self.gateway.draining = True

    async def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish up to the drain timeout, then close."""
        self.begin_drain()
        if self.gateway is not None:
            drained = await self.gateway.wait_idle(self.config.timeouts.drain)
            self.log.info("drained" if drained else "drain_timeout", inflight=self.gateway.inflight)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.gateway is not None:
            await self.gateway.session.close()
        self.log.info("stopped")


async def serve(config: Config) -> None:
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()
