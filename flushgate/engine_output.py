"""Where the engine's output goes: structured events for machines, one progress line for a person."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import IO, Any

from flushgate.engine.supervisor import EngineState, EngineSupervisor

_ALARMING = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|Error:")


class EngineOutput:
    """Re-emits every engine line; nothing is dropped.

    JSON mode: each line is a structured event (``source=engine``). Console mode: lines go to ``log_file`` and
    only alarming ones reach the terminal, where a progress line shows the load phase instead of a wall of logs.
    """

    def __init__(self, log: Any, *, console: bool, log_file: Path | None) -> None:
        self._log = log.bind(source="engine")
        self._console = console
        self._file: IO[str] | None = None
        if console and log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._file = log_file.open("a", encoding="utf-8", buffering=1)
        self.log_file = log_file

    def line(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            if _ALARMING.search(line):
                self._log.warning("engine_log", line=line)
        else:
            self._log.info("engine_log", line=line)

    def event(self, name: str, level: str = "info", **fields: Any) -> None:
        if self._console:
            _clear_progress()
        getattr(self._log, level)(name, **fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


async def show_progress(supervisor: EngineSupervisor, log_file: Path | None) -> None:
    """While the engine loads, keep one terminal line current: elapsed time and phase."""
    if not sys.stderr.isatty():
        return
    where = f" (engine log: {log_file})" if log_file else ""
    while True:
        if supervisor.state is EngineState.STARTING:
            elapsed = time.monotonic() - supervisor.started_at
            sys.stderr.write(f"\r\x1b[K  engine: {supervisor.phase.value} · {elapsed:4.0f} s{where}")
            sys.stderr.flush()
        await asyncio.sleep(0.5)
