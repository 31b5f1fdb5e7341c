"""Lifecycle: bind the gateway, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from flushgate import __version__
from flushgate.config import Config
from flushgate.engine.backend import EngineBackend
from flushgate.engine.command import build_spec
from flushgate.engine.placement import place_engines, visible_gpus
from flushgate.engine.presets import get_preset
from flushgate.engine.supervisor import EngineSupervisor
from flushgate.engine_output import EngineOutput, show_progress
from flushgate.engine_timing import EngineTimings, OtlpReceiver
from flushgate.logs import get_logger, is_console
from flushgate.metrics import Metrics
from flushgate.proxy.app import build_app
from flushgate.proxy.discovery import DnsDiscovery, DnsTarget, SrvLookup, dnspython_srv
from flushgate.proxy.front import Front
from flushgate.proxy.health_checks import HealthChecker
from flushgate.proxy.model_aliases import MODEL_REGISTRY
from flushgate.proxy.ollama.settings import OllamaSettings, parse_thinking_aliases
from flushgate.proxy.pool import Ejection, EnginePool
from flushgate.proxy.router import Router, RoutingPolicy
from flushgate.proxy.security import GUARDS
from flushgate.proxy.state import Gateway
from flushgate.proxy.upstream import AttachedBackend, Backend, open_session
from flushgate.recorder import Recorder
from flushgate.worker_metrics import WorkerMetrics

HEALTH_CHECK_TIMEOUT_S = 2.0
BACKLOG = 1024  # connections the kernel queues before they are accepted (256 streams may open at once)


class Server:
    """Owns the listening socket, the upstream session and the drain on shutdown."""

    def __init__(
        self,
        config: Config,
        backend: Backend | None = None,
        *,
        resolver: AbstractResolver | None = None,
        srv_lookup: SrvLookup = dnspython_srv,
    ) -> None:
        self.config = config.validate()
        self.log: Any = get_logger("gateway")
        self._backend = backend
        self._resolver = resolver  # DNS discovery's address lookups; default: the system's (getaddrinfo)
        self._srv_lookup = srv_lookup
        self._runner: web.AppRunner | None = None
        self.gateway: Gateway | None = None
        self.router: Router | None = None
        self.supervisor: EngineSupervisor | None = None  # the first managed engine
        self.supervisors: list[EngineSupervisor] = []
        self._engine_outputs: list[EngineOutput] = []
        self._progress: asyncio.Task[None] | None = None
        self._receiver: OtlpReceiver | None = None
        self.health_checker: HealthChecker | None = None
        self.discovery: DnsDiscovery | None = None
        self.engine_timings: EngineTimings | None = None
        self.port: int = config.port
        self.front: Front | None = None  # the hot route's own protocol, unless --no-own-server
        self._listeners: list[asyncio.Server] = []
        self.worker_metrics: WorkerMetrics | None = None

    async def _make_backends(self) -> list[Backend]:
        config = self.config
        if config.upstream is not None or config.upstream_dns is not None:
            if config.engine_traces_port is not None:
                await self._receive_engine_timing(config.engine_traces_port)
            return [AttachedBackend(url) for url in config.upstream_bases]  # DNS discovery fills its pool itself
        assert config.model is not None
        if config.engine_timing:
            await self._receive_engine_timing(0)
        preset = get_preset(config.preset) if config.preset else None
        gpus = config.gpus if config.gpus is not None else visible_gpus()
        placements = place_engines(config.engines, gpus, (*(preset.args if preset else ()), *config.engine_args))
        console = is_console(config.log_format)
        several = len(placements) > 1
        backends: list[Backend] = []
        for placement in placements:
            spec = build_spec(
                config.model,
                python=config.engine_python or sys.executable,
                preset=preset,
                extra_args=(*config.engine_args, *placement.args),
                served_model_name=config.served_model_name,
                base_env={**os.environ, **placement.env} if placement.env else None,
                traces_endpoint=self._receiver.endpoint if self._receiver else None,
                keepalive_s=config.timeouts.engine_keepalive,
            )
            log_file = Path(config.engine_log or ".cache/flushgate/engine.log") if console else None
            if log_file is not None and several:
                log_file = log_file.with_name(f"{log_file.stem}-{placement.index}{log_file.suffix}")
            output = EngineOutput(self.log.bind(engine=spec.base_url) if several else self.log, console=console,
                                  log_file=log_file)  # fmt: skip
            supervisor = EngineSupervisor(
                spec, on_line=output.line, on_event=output.event, stop_grace_s=config.engine_grace
            )
            self._engine_outputs.append(output)
            self.supervisors.append(supervisor)
            backends.append(EngineBackend(supervisor))
            if several:
                self.log.info("engine_placed", engine=spec.base_url, index=placement.index, gpu=placement.gpu,
                              args=list(placement.args))  # fmt: skip
        self.supervisor = self.supervisors[0]
        if console:
            self._progress = asyncio.create_task(show_progress(self.supervisor, self._engine_outputs[0].log_file))
        return backends

    def _make_router(self, backends: list[Backend]) -> Router:
        routing = self.config.routing
        pool = EnginePool(backends, ejection=Ejection(routing.eject_after, routing.eject_time))
        policy = RoutingPolicy(routing.mode, routing.affinity_load_factor, routing.retries)
        return Router(pool, policy, source=self.config.upstream_dns)

    async def _receive_engine_timing(self, port: int) -> None:
        self.engine_timings = EngineTimings()
        self._receiver = OtlpReceiver(self.engine_timings, self.log)
        await self._receiver.start(port)

    async def start(self) -> None:
        config = self.config
        backends = [self._backend] if self._backend is not None else await self._make_backends()
        router = self.router = self._make_router(backends)
        gateway_state: list[Gateway] = []
        supervisors = self.supervisors
        metrics = Metrics(
            inflight=lambda: float(gateway_state[0].inflight),
            engine_restarts=(lambda: float(sum(s.restarts for s in supervisors))) if supervisors else None,
            router=router,
        )
        session = open_session(config.timeouts)
        self.gateway = Gateway(
            backend=router if router.several else backends[0],
            router=router,
            session=session,
            timeouts=config.timeouts,
            log=self.log,
            recorder=Recorder(self.log, metrics, self.engine_timings),
            hop_timing=config.hop_timing,
            timing_summary=config.timing_summary,
            log_content=config.log_content,
            max_body_bytes=config.limits.max_body_bytes,
            body_timeout=config.limits.body_timeout,
            ollama=OllamaSettings(thinking_aliases=parse_thinking_aliases(config.thinking_aliases)),
        )
        gateway_state.append(self.gateway)
        if config.worker_metrics_dir is not None and config.worker_index is not None:
            self.worker_metrics = WorkerMetrics(Path(config.worker_metrics_dir), config.worker_index, metrics.render)
            await self.worker_metrics.start()
            metrics.group = self.worker_metrics
        if config.upstream_dns is not None:
            self.discovery = DnsDiscovery(
                DnsTarget.parse(config.upstream_dns),
                router.pool,
                make_backend=AttachedBackend,
                resolver=self._resolver or aiohttp.ThreadedResolver(),
                srv_lookup=self._srv_lookup,
                interval_s=config.routing.dns_interval,
                log=self.log,
            )
            await self.discovery.refresh()  # before listening: the first requests find the engines already there
            self.discovery.start()
        if router.several and config.routing.health_interval > 0:
            self.health_checker = HealthChecker(
                router.pool,
                session,
                interval_s=config.routing.health_interval,
                timeout_s=HEALTH_CHECK_TIMEOUT_S,
                log=self.log,
            )
            self.health_checker.start()
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
        await self._listen()
        engines = [m.url for m in router.pool.members]
        self.log.info(
            "listening",
            version=__version__,
            pid=os.getpid(),
            url=f"http://{config.host}:{self.port}",
            upstream=engines[0] if len(engines) == 1 and not router.several else engines,
            idle_timeout_s=config.timeouts.idle,
            managed_engine=self.supervisor is not None,
            **({"routing": config.routing.mode} if router.several else {}),
        )
        for supervisor in self.supervisors:
            supervisor.start()  # after binding: the gateway answers (503 + Retry-After) while the model loads

    async def _listen(self) -> None:
        """Bind: aiohttp's server alone, or the gateway's own protocol (proxy/front.py) handing it the rest."""
        config = self.config
        assert self._runner is not None
        assert self.gateway is not None
        reuse_port = config.reuse_port or None
        if not config.own_server:
            site = web.TCPSite(self._runner, config.host, config.port, backlog=BACKLOG, reuse_port=reuse_port)
            await site.start()
            self.port = site.port
            return
        aiohttp_server = self._runner.server
        assert aiohttp_server is not None
        limits = config.limits
        self.front = Front(
            self.gateway,
            self._runner.app[GUARDS],
            self._runner.app[MODEL_REGISTRY],
            aiohttp_server,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout,
        )
        stats = self.front.stats
        self.gateway.recorder.metrics.watch_own_server(lambda: stats.answered, lambda: stats.handed_over)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            self.front, config.host, config.port, backlog=BACKLOG, reuse_port=reuse_port
        )
        # More handles on the same socket (dups of it): uvloop's libuv accepts one connection per handle and turn
        # of the event loop, and a turn under hundreds of streams takes a while. With one handle the last clients
        # of a 256-connection burst were accepted 130-150 ms after they had connected (docs/scaling.md).
        self._listeners = [listener]
        for sock in listener.sockets:
            for _ in range(config.accept_handles - 1):
                self._listeners.append(await loop.create_server(self.front, sock=sock.dup(), backlog=BACKLOG))
        self.port = listener.sockets[0].getsockname()[1]

    def begin_drain(self) -> None:
        """From now on readiness fails and new requests get 503; in-flight ones carry on."""
        if self.gateway is not None:
            self.gateway.draining = True

    async def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish up to the drain timeout, then close."""
        self.begin_drain()
        if self.gateway is not None:
            self.log.info("draining", inflight=self.gateway.inflight, drain_timeout_s=self.config.timeouts.drain)
            drained = await self.gateway.wait_idle(self.config.timeouts.drain)
            self.log.info("drained" if drained else "drain_timeout", inflight=self.gateway.inflight)
        if self.gateway is not None:
            await self.gateway.recorder.flush()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.health_checker is not None:
            await self.health_checker.stop()
        await asyncio.gather(*(supervisor.stop() for supervisor in self.supervisors))
        if self._receiver is not None:
            await self._receiver.stop()
        if self._progress is not None:
            self._progress.cancel()
        for output in self._engine_outputs:
            output.close()
        for listener in self._listeners:
            listener.close()
        if self.front is not None:
            self.front.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.worker_metrics is not None:
            await self.worker_metrics.stop()
        if self.gateway is not None:
            await self.gateway.session.close()
            self.gateway.engines.close()
        self.log.info("stopped")


async def serve(config: Config) -> None:
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # What start-up made lives as long as the process. Frozen, it is left out of every later full collection,
    # which would otherwise walk all of it while streams wait (25-55 ms at a time under 256 streams).
    gc.collect()
    gc.freeze()
    await stop.wait()
    await server.stop()
