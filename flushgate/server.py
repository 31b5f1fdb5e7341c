"""Lifecycle: bind the gateway, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from flushgate import __version__
from flushgate.config import Config
from flushgate.engine.backend import EngineBackend
from flushgate.engine.command import build_spec
from flushgate.engine.presets import get_preset
from flushgate.engine.supervisor import EngineSupervisor
from flushgate.engine_output import EngineOutput, show_progress
from flushgate.engine_timing import EngineTimings, OtlpReceiver
from flushgate.logs import get_logger, is_console
from flushgate.metrics import Metrics
from flushgate.proxy.app import build_app
from flushgate.proxy.ollama.settings import OllamaSettings, parse_thinking_aliases
from flushgate.proxy.passthrough import connection_tracing
from flushgate.proxy.state import Gateway
from flushgate.proxy.upstream import AttachedBackend, Backend, open_session
from flushgate.recorder import Recorder


class Server:
    """Owns the listening socket, the upstream session and the drain on shutdown."""

    def __init__(self, config: Config, backend: Backend | None = None) -> None:
        self.config = config.validate()
        self.log: Any = get_logger("gateway")
        self._backend = backend
        self._runner: web.AppRunner | None = None
        self.gateway: Gateway | None = None
        self.supervisor: EngineSupervisor | None = None
        self._engine_output: EngineOutput | None = None
        self._progress: asyncio.Task[None] | None = None
        self._receiver: OtlpReceiver | None = None
        self.engine_timings: EngineTimings | None = None
        self.port: int = config.port

    async def _make_backend(self) -> Backend:
        config = self.config
        if config.upstream_base is not None:
            if config.engine_traces_port is not None:
                await self._receive_engine_timing(config.engine_traces_port)
            return AttachedBackend(config.upstream_base)
        assert config.model is not None
        if config.engine_timing:
            await self._receive_engine_timing(0)
        spec = build_spec(
            config.model,
            python=config.engine_python or sys.executable,
            preset=get_preset(config.preset) if config.preset else None,
            extra_args=config.engine_args,
            served_model_name=config.served_model_name,
            traces_endpoint=self._receiver.endpoint if self._receiver else None,
        )
        console = is_console(config.log_format)
        log_file = Path(config.engine_log or ".cache/flushgate/engine.log") if console else None
        self._engine_output = EngineOutput(self.log, console=console, log_file=log_file)
        self.supervisor = EngineSupervisor(
            spec,
            on_line=self._engine_output.line,
            on_event=self._engine_output.event,
            stop_grace_s=config.engine_grace,
        )
        if console:
            self._progress = asyncio.create_task(show_progress(self.supervisor, log_file))
        return EngineBackend(self.supervisor)

    async def _receive_engine_timing(self, port: int) -> None:
        self.engine_timings = EngineTimings()
        self._receiver = OtlpReceiver(self.engine_timings, self.log)
        await self._receiver.start(port)

    async def start(self) -> None:
        config = self.config
        backend = self._backend or await self._make_backend()
        gateway_state: list[Gateway] = []
        metrics = Metrics(
            inflight=lambda: float(gateway_state[0].inflight),
            engine_restarts=(lambda: float(sup.restarts)) if (sup := self.supervisor) else None,
        )
        self.gateway = Gateway(
            backend=backend,
            session=open_session(config.timeouts, [connection_tracing()]),
            timeouts=config.timeouts,
            log=self.log,
            recorder=Recorder(self.log, metrics, self.engine_timings),
            hop_timing=config.hop_timing,
            timing_summary=config.timing_summary,
            log_content=config.log_content,
            max_body_bytes=config.limits.max_body_bytes,
            ollama=OllamaSettings(thinking_aliases=parse_thinking_aliases(config.thinking_aliases)),
        )
        gateway_state.append(self.gateway)
        # handler_cancellation: a client that goes away cancels its handler, which closes the upstream request,
        # even while a non-streamed request is still waiting for the engine's answer.
        # The header limits and the head-read timeout act in aiohttp's HTTP parser, before any handler runs.
        limits = config.limits
        self._runner = web.AppRunner(
            build_app(self.gateway, config.access, limits),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.header_timeout,
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
            managed_engine=self.supervisor is not None,
        )
        if self.supervisor is not None:
            self.supervisor.start()  # after binding: the gateway answers (503 + Retry-After) while the model loads

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
        if self.gateway is not None:
            await self.gateway.recorder.flush()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._receiver is not None:
            await self._receiver.stop()
        if self._progress is not None:
            self._progress.cancel()
        if self._engine_output is not None:
            self._engine_output.close()
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
