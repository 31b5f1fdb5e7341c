"""One validated configuration object, built once from flags and ``FLUSHGATE_*`` variables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

LogFormat = Literal["auto", "json", "console"]
RoutingMode = Literal["least-outstanding", "prefix-affinity"]
ROUTING_MODES: tuple[RoutingMode, ...] = ("least-outstanding", "prefix-affinity")


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every time limit the gateway applies, in seconds, in one place.

    There is deliberately no total timeout for streams: a long answer is not an error.
    """

    connect: float = 5.0
    idle: float | None = 600.0  # between upstream reads; None disables it
    drain: float = 30.0
    engine_keepalive: float = 4.0  # an idle engine connection is reused for this long (see engine_keepalive)


ATTACHED_KEEPALIVE_S = 4.0  # under the 5 s after which vLLM's server (uvicorn) closes an idle connection
MANAGED_KEEPALIVE_S = 60.0  # nginx's upstream keepalive_timeout; the managed engine is told to keep longer
ENGINE_KEEPALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"  # vLLM's own idle-connection time, in whole seconds


def engine_keepalive(given: float | None, *, managed: bool, environ: Mapping[str, str]) -> float:
    """How long an idle engine connection is kept for the next request.

    It must end before the engine's own idle time does, or a request can go out on a connection the engine is
    closing. An attached engine's time is not known: vLLM's default 5 s is assumed unless a time is given. A
    managed engine is started with its time set to this one plus a second (``managed_engine_env``), unless the
    environment already sets it; then that is the bound.
    """
    engines_own = environ.get(ENGINE_KEEPALIVE_ENV) if managed else None
    if engines_own is not None:
        try:
            bound = float(engines_own)
        except ValueError:
            raise ConfigError(f"{ENGINE_KEEPALIVE_ENV} must be a number of seconds, got {engines_own!r}") from None
        if given is None:
            return max(bound - 1, 0.0)
        if given >= bound:
            raise ConfigError(
                f"--engine-keepalive {given:g} must be under the engine's own {ENGINE_KEEPALIVE_ENV}={engines_own}"
            )
    if given is None:
        return MANAGED_KEEPALIVE_S if managed else ATTACHED_KEEPALIVE_S
    return given


def managed_engine_env(keepalive_s: float) -> dict[str, str]:
    """What a managed engine is started with so that it keeps idle connections longer than the gateway does."""
    return {ENGINE_KEEPALIVE_ENV: str(math.ceil(keepalive_s) + 1)}


@dataclass(frozen=True, slots=True)
class Routing:
    """How several engines share the load and what takes one out of rotation (see proxy/router.py)."""

    mode: RoutingMode = "least-outstanding"
    affinity_load_factor: float = 1.5
    retries: int = 2
    health_interval: float = 2.0  # seconds between active checks of every engine; 0 turns them off
    eject_after: int = 3  # 5xx answers or broken streams in a row
    eject_time: float = 10.0
    dns_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may send and hold; the defaults bound memory without getting in a normal client's way."""

    max_body_bytes: int = 32 << 20  # a declared Content-Length above this is refused; 0: no limit
    max_header_bytes: int = 8190  # the request line and each header line (aiohttp's own default)
    max_headers: int = 128
    header_timeout: float = 30.0  # a request's head must arrive within this (slowloris); also the keep-alive idle
    body_timeout: float = 60.0  # the longest pause in a streamed request body (nginx's client_body_timeout)
    max_concurrent: int = 0  # requests in flight before new ones get 429; 0: no cap


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use the gateway and which of the engine's routes it exposes."""

    api_keys: tuple[str, ...] = ()  # none: no authentication
    metrics_auth: bool = False  # /metrics needs a key too
    allow_routes: tuple[str, ...] = ()  # engine routes forwarded beyond the inference and listing ones
    cors_origins: tuple[str, ...] = ()  # none: no cross-origin browser access


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    upstream: str | tuple[str, ...] | None = None  # one URL, or several
    upstream_dns: str | None = None  # NAME:PORT or an SRV name: engines found in DNS, looked up again and again
    engines: int = 1  # managed engines
    gpus: tuple[str, ...] | None = None  # GPUs to spread managed engines over; None: those visible
    routing: Routing = field(default_factory=Routing)
    model: str | None = None
    preset: str | None = None
    engine_args: tuple[str, ...] = ()
    served_model_name: str | None = None
    engine_python: str | None = None  # interpreter that has vLLM; default: the gateway's own
    engine_grace: float = 15.0  # after SIGTERM, seconds before the engine gets SIGKILL
    engine_log: str | None = None  # console mode: file for the engine's own lines
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_format: LogFormat = "auto"
    log_content: bool = False
    hop_timing: bool = True
    own_server: bool = True  # the pass-through's plain POSTs on the gateway's own protocol (proxy/front.py)
    accept_handles: int = 8  # own server: handles on the listening socket, each accepting one per loop turn
    timing_summary: bool = False
    engine_timing: bool = True  # managed engine: join vLLM's per-request spans into the record
    limits: Limits = field(default_factory=Limits)
    access: Access = field(default_factory=Access)
    engine_traces_port: int | None = None  # attach mode: receive an external vLLM's per-request spans here
    thinking_aliases: str = "think=on,nothink=off"  # Ollama model-name tags that switch Qwen3-style thinking
    workers: int = 1  # gateway processes sharing the port (SO_REUSEPORT); see flushgate/workers.py
    reuse_port: bool = False  # this process is one of several on the port
    worker_index: int | None = None  # which of them (flushgate/workers.py)
    worker_metrics_dir: str | None = None  # where the group's workers serve their metrics to each other

    def validate(self) -> Config:
        sources = sum(x is not None for x in (self.upstream, self.upstream_dns, self.model))
        if sources != 1 and self.upstream_dns is not None:
            raise ConfigError("give exactly one of --upstream URL, --upstream-dns NAME:PORT or --model DIR")
        if sources != 1:
            raise ConfigError("give exactly one of --upstream URL (attach to an engine) or --model DIR (manage one)")
        if self.model is None and (self.preset or self.engine_args or self.served_model_name):
            raise ConfigError("--preset, --engine-arg and --served-model-name need --model (a managed engine)")
        if self.model is None and (self.engines != 1 or self.gpus is not None):
            raise ConfigError("--engines and --gpus need --model (managed engines)")
        if self.engines < 1:
            raise ConfigError(f"--engines must be at least 1, got {self.engines}")
        if self.accept_handles < 1:
            raise ConfigError(f"--accept-handles must be at least 1, got {self.accept_handles}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.workers > 1 and self.model is not None:
            raise ConfigError(
                "--workers needs --upstream or --upstream-dns: a managed engine is supervised by one process; run "
                "one flushgate with --model, and put a --workers gateway in front of it with --upstream"
            )
        if self.workers > 1 and self.engine_traces_port is not None:
            raise ConfigError("--engine-traces-port needs --workers 1: the engine sends its spans to one receiver")
        self._validate_routing()
        if self.preset is not None:
            from flushgate.engine.presets import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"unknown --preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        try:
            from flushgate.proxy.ollama.settings import parse_thinking_aliases

            parse_thinking_aliases(self.thinking_aliases)
        except ValueError as exc:
            raise ConfigError(f"--thinking-aliases: {exc}") from None
        if self.engine_traces_port is not None and not 0 < self.engine_traces_port <= 65535:
            raise ConfigError(f"--engine-traces-port must be 1..65535, got {self.engine_traces_port}")
        if self.engine_grace < 0:
            raise ConfigError("--engine-grace must not be negative")
        if self.upstream is not None and not self.upstreams:
            raise ConfigError("--upstream needs at least one URL")
        for upstream in self.upstreams:
            parts = urlsplit(upstream)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"--upstream must be an http(s)://HOST:PORT URL, got {upstream!r}")
            if parts.path not in ("", "/") or parts.query:
                raise ConfigError(f"--upstream takes no path or query, got {upstream!r}")
        if len(set(self.upstream_bases)) != len(self.upstream_bases):
            raise ConfigError(f"--upstream names an engine twice: {', '.join(self.upstreams)}")
        if self.upstream_dns is not None:
            from flushgate.proxy.discovery import DnsTarget

            try:
                DnsTarget.parse(self.upstream_dns)
            except ValueError as exc:
                raise ConfigError(f"--upstream-dns: {exc}") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.timeouts.connect <= 0:
            raise ConfigError("--connect-timeout must be positive")
        if self.timeouts.idle is not None and self.timeouts.idle <= 0:
            raise ConfigError("--idle-timeout must be positive (0 disables it)")
        if self.timeouts.drain < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if self.timeouts.engine_keepalive < 0:
            raise ConfigError("--engine-keepalive must not be negative (0: a new connection for every request)")
        _validate_limits(self.limits)
        _validate_access(self.access)
        return self

    def _validate_routing(self) -> None:
        r = self.routing
        if r.mode not in ROUTING_MODES:
            raise ConfigError(f"--routing must be one of {', '.join(ROUTING_MODES)}, got {r.mode!r}")
        if not r.affinity_load_factor >= 1:
            raise ConfigError("--affinity-load-factor must be at least 1 (1: never above the average load)")
        if r.retries < 0:
            raise ConfigError("--retries must not be negative")
        if r.health_interval < 0:
            raise ConfigError("--health-interval must not be negative (0 turns active checks off)")
        if r.eject_after < 1:
            raise ConfigError("--eject-after must be at least 1")
        if r.eject_time < 0:
            raise ConfigError("--eject-time must not be negative")
        if r.dns_interval <= 0:
            raise ConfigError("--dns-interval must be positive")

    @property
    def upstreams(self) -> tuple[str, ...]:
        if self.upstream is None:
            return ()
        return (self.upstream,) if isinstance(self.upstream, str) else self.upstream

    @property
    def upstream_bases(self) -> tuple[str, ...]:
        return tuple(url.rstrip("/") for url in self.upstreams)

    @property
    def upstream_base(self) -> str | None:
        """The first (or only) attached engine."""
        return self.upstream_bases[0] if self.upstream is not None else None


def _validate_limits(limits: Limits) -> None:
    if limits.max_body_bytes < 0:
        raise ConfigError("--max-body-bytes must not be negative (0 disables it)")
    if limits.max_header_bytes < 256:
        raise ConfigError("--max-header-bytes must be at least 256")
    if limits.max_headers < 8:
        raise ConfigError("--max-headers must be at least 8")
    if limits.header_timeout <= 0:
        raise ConfigError("--header-timeout must be positive")
    if limits.body_timeout <= 0:
        raise ConfigError("--body-timeout must be positive")
    if limits.max_concurrent < 0:
        raise ConfigError("--max-concurrent must not be negative (0 disables it)")


def _validate_access(access: Access) -> None:
    if access.metrics_auth and not access.api_keys:
        raise ConfigError("--metrics-auth needs at least one --api-key or --api-key-file")
    for key in access.api_keys:
        if not key or any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError("an API key must be non-empty printable text without spaces")
    for route in access.allow_routes:
        if not route.startswith("/") or "?" in route or "#" in route:
            raise ConfigError(f"--allow-route takes a path such as /v1/load_lora_adapter, got {route!r}")
    for origin in access.cors_origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"--cors-origin takes * or an origin such as https://chat.example.com, got {origin!r}")


def read_key_file(path: str) -> tuple[str, ...]:
    """API keys from a file: one per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"--api-key-file {path} holds no key")
    return keys
