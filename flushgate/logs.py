"""structlog set-up: JSON lines (orjson) for machines, a readable renderer for a terminal.

The per-request record is the one line written for every request, so in JSON mode it skips structlog's generic
path (its keyword arguments copied three times, its processors called one by one: five times the cost)
and is rendered here into the very line structlog would write (``RecordLines``; a test holds the two equal)."""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog

from flushgate.config import LogFormat

RecordWriter = Callable[[dict[str, Any]], None]  # writes one record's fields as the event "request"

_UTC = datetime.UTC
_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
_record_lines: RecordLines | None = None  # set by ``configure`` in JSON mode


def is_console(fmt: LogFormat) -> bool:
    return fmt == "console" or (fmt == "auto" and sys.stdout.isatty())


def processors(console: bool, worker: int | None = None) -> list[Any]:
    """structlog's chain: level, time, the worker's index (``--workers N``), then the renderer."""
    chain: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:

        def tag(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
            event["worker"] = worker
            return event

        chain.append(tag)
    if console:
        chain.append(structlog.dev.ConsoleRenderer())
    else:
        chain.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
    return chain


def configure(fmt: LogFormat = "auto", worker: int | None = None) -> None:
    """``worker``: this process's index under ``--workers N``, added to every event it logs."""
    global _record_lines
    console = is_console(fmt)
    factory: Any
    if console:
        factory = structlog.PrintLoggerFactory(sys.stdout)
        _record_lines = None
    else:
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
        _record_lines = RecordLines(sys.stdout.buffer, worker)
    structlog.configure(
        processors=processors(console, worker),
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )


def get_logger(source: str) -> Any:
    return structlog.get_logger().bind(source=source)


class RecordLines:
    """Records as the JSON lines ``configure``'s structlog chain writes: the logger's bound context, the fields,
    ``event``, ``level``, ``timestamp`` (ISO 8601, UTC, as structlog's ``TimeStamper``), ``worker`` if set."""

    __slots__ = ("_out", "_worker")

    def __init__(self, out: IO[bytes], worker: int | None) -> None:
        self._out = out
        self._worker = worker

    def writer(self, context: dict[str, Any]) -> RecordWriter:
        out, worker = self._out, self._worker

        def write(fields: dict[str, Any]) -> None:
            line = context | fields
            line["event"] = "request"
            line["level"] = "info"
            line["timestamp"] = datetime.datetime.now(_UTC)  # orjson writes it as isoformat() with Z for +00:00
            if worker is not None:
                line["worker"] = worker
            out.write(orjson.dumps(line, default=repr, option=_OPTIONS))  # repr: as structlog's fallback
            out.flush()

        return write


def record_writer(log: Any) -> RecordWriter:
    """How records logged through ``log`` are written: JSON lines rendered here once ``configure`` chose JSON,
    else through structlog (a terminal's renderer, or whatever a test has configured)."""
    if _record_lines is not None:
        return _record_lines.writer(structlog.get_context(log))
    return lambda fields: log.info("request", **fields)
