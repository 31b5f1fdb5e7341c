"""structlog set-up: JSON lines (orjson) for machines, a readable renderer for a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from flushgate.config import LogFormat


def is_console(fmt: LogFormat) -> bool:
    return fmt == "console" or (fmt == "auto" and sys.stdout.isatty())


def configure(fmt: LogFormat = "auto", worker: int | None = None) -> None:
    """``worker``: this process's index under ``--workers N``, added to every event it logs."""
    console = is_console(fmt)
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:

        def tag(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
            event["worker"] = worker
            return event

        processors.append(tag)
    if console:
        processors.append(structlog.dev.ConsoleRenderer())
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )


def get_logger(source: str) -> Any:
    return structlog.get_logger().bind(source=source)
