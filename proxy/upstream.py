"""The engine as the gateway sees it: a base URL, whether it can take requests, and how to ask if it is ready."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Protocol

import aiohttp

from flushgate.config import Timeouts
from flushgate.proxy.engine_http import EngineConnectError, EngineConnectTimeout
from flushgate.timings import RequestTimings, now


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why the engine cannot take a request right now, and when a client should try again."""

    message: str
    code: str
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class FailedBeforeAnswer:
    """What to tell a client, in either API's shape, when the engine failed before sending a response head."""

    status: int
    code: str
    message: str
    connect: bool  # the connection itself failed (the engine leaves rotation at once), not the exchange on it

    @classmethod
    def of(cls, exc: BaseException, base: str) -> FailedBeforeAnswer:
        if isinstance(exc, (aiohttp.ConnectionTimeoutError, EngineConnectTimeout)):
            return cls(504, "upstream_connect_timeout", f"connecting to the engine at {base} timed out", True)
        if isinstance(exc, TimeoutError):
            return cls(504, "upstream_timeout", f"the engine at {base} sent no response in time", False)
        if isinstance(exc, (aiohttp.ClientConnectorError, EngineConnectError)):
            reason = exc.os_error.strerror or str(exc)
            return cls(502, "upstream_unreachable", f"the engine at {base} is unreachable: {reason}", True)
        return cls(502, "upstream_error", f"the engine at {base} failed before answering: {exc}", False)


def closed_unanswered(exc: BaseException, timings: RequestTimings) -> bool:
    """A pooled connection the engine closed or reset with no answer: its idle close crossed the request's way,
    and the request may go once more on a new connection, as the pass-through does (``EngineStale``). aiohttp
    resends only idempotent requests itself; the engine's are POSTs."""
    if not timings.connection_reused or isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: dict[str, object] = field(default_factory=dict)


class Backend(Protocol):
    """What the gateway needs from an engine, attached or managed; no process code crosses this line."""

    @property
    def base_url(self) -> str: ...

    def unavailable(self) -> Unavailable | None: ...

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness: ...


class AttachedBackend:
    """An engine someone else runs (the Kubernetes sidecar case): readiness follows its ``/health``."""

    def __init__(self, base_url: str, probe_timeout_s: float = 2.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)

    @property
    def base_url(self) -> str:
        return self._base_url

    def unavailable(self) -> Unavailable | None:
        # Requests always go through; if the engine is down the client gets a 502 naming it.
        return None

    async def readiness(self, session: aiohttp.ClientSession) -> Readiness:
        return await probe_health(session, self._base_url, self._probe_timeout)


async def probe_health(
    session: aiohttp.ClientSession, base_url: str, probe_timeout: aiohttp.ClientTimeout
) -> Readiness:
    url = base_url + "/health"
    try:
        async with session.get(url, timeout=probe_timeout) as resp:
            await resp.read()
            return Readiness(resp.status == 200, {"upstream": base_url, "health_status": resp.status})
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Readiness(False, {"upstream": base_url, "error": str(exc) or type(exc).__name__})


def open_session(timeouts: Timeouts) -> aiohttp.ClientSession:
    """One pooled session for the engine traffic the pass-through does not carry (Ollama routes, health, models).

    No connection cap (aiohttp's default of 100 would silently queue the 101st stream), no decompression (bytes
    are forwarded as sent), no cookie jar (a gateway must not carry one user's cookies to another), and no total
    timeout: only connect and idle-between-reads limits. A request passed ``trace_request_ctx=timings`` gets its
    connect start/end, or that its connection was pooled, stamped into those ``RequestTimings``.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=timeouts.engine_keepalive)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=timeouts.idle),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Content-Type"),
        trace_configs=[_connection_tracing()],
    )


def _connection_tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def create_start(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connect_start = now()
            timings.connection_reused = False

    async def create_end(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connect_end = now()

    async def reused(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
        if isinstance(timings := ctx.trace_request_ctx, RequestTimings):
            timings.connection_reused = True

    trace.on_connection_create_start.append(create_start)
    trace.on_connection_create_end.append(create_end)
    trace.on_connection_reuseconn.append(reused)
    return trace
