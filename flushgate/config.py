"""One validated configuration object, built once from flags and ``FLUSHGATE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

LogFormat = Literal["auto", "json", "console"]


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


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    upstream: str | None = None
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
    timing_summary: bool = False
    engine_timing: bool = True  # managed engine: join vLLM's per-request spans into the record
    engine_traces_port: int | None = None  # attach mode: receive an external vLLM's per-request spans here
    thinking_aliases: str = "think=on,nothink=off"  # Ollama model-name tags that switch Qwen3-style thinking

    def validate(self) -> Config:
        if (self.upstream is None) == (self.model is None):
            raise ConfigError("give exactly one of --upstream URL (attach to an engine) or --model DIR (manage one)")
        if self.model is None and (self.preset or self.engine_args or self.served_model_name):
            raise ConfigError("--preset, --engine-arg and --served-model-name need --model (a managed engine)")
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
        if self.upstream is not None:
            parts = urlsplit(self.upstream)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"--upstream must be an http(s)://HOST:PORT URL, got {self.upstream!r}")
            if parts.path not in ("", "/") or parts.query:
                raise ConfigError(f"--upstream takes no path or query, got {self.upstream!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.timeouts.connect <= 0:
            raise ConfigError("--connect-timeout must be positive")
        if self.timeouts.idle is not None and self.timeouts.idle <= 0:
            raise ConfigError("--idle-timeout must be positive (0 disables it)")
        if self.timeouts.drain < 0:
            raise ConfigError("--drain-timeout must not be negative")
        return self

    @property
    def upstream_base(self) -> str | None:
        return None if self.upstream is None else self.upstream.rstrip("/")
