"""The engine's lifecycle as a small state machine: starting → ready → crashed → starting … → stopping → stopped.

The supervisor starts vLLM, turns its output into events, decides when it is ready, restarts it with
exponential backoff when it dies, and stops its whole process tree on shutdown. It knows nothing of the
gateway's server; the gateway sees it only through ``EngineBackend`` (see ``engine/backend.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from flushgate.engine.command import EngineSpec
from flushgate.engine.logparse import LoadPhase, advance
from flushgate.engine.process import EngineProcess, end_group, spawn, terminate


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    CRASHED = "crashed"  # exited unexpectedly; a restart is scheduled
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart n (1-based): first, 2x first, 4x first, ... capped at ``maximum``."""

    first_s: float = 1.0
    maximum_s: float = 60.0
    stable_after_s: float = 60.0  # an engine ready this long resets the sequence

    def delay(self, failures: int) -> float:
        return float(min(self.maximum_s, self.first_s * 2 ** max(0, failures - 1)))


CRASH_LOOP_AFTER = 3
OUTPUT_LINE_LIMIT = 1 << 20
PROBE_TIMEOUT_S = 2.0  # a readiness probe must answer quickly, whatever the gateway's idle timeout
LOG_TAIL_LINES = 50

LineSink = Callable[[str], None]
EventSink = Callable[..., None]


class EngineSupervisor:
    def __init__(
        self,
        spec: EngineSpec,
        *,
        on_line: LineSink,
        on_event: EventSink,
        backoff: Backoff | None = None,
        stop_grace_s: float = 15.0,
        poll_interval_s: float = 0.25,
    ) -> None:
        self.spec = spec
        self._on_line = on_line
        self._on_event = on_event
        self.backoff = backoff or Backoff()
        self.stop_grace_s = stop_grace_s
        self.poll_interval_s = poll_interval_s

        self.state = EngineState.STOPPED
        self.phase = LoadPhase.STARTING
        self.pid: int | None = None
        self.started_at = 0.0  # monotonic time of the current process's start
        self.ready_at = 0.0
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_exit_code: int | None = None
        self.next_start_at = 0.0
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

        self._proc: EngineProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._change = asyncio.Event()

    # --- what the gateway reads -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def crash_loop(self) -> bool:
        return self.consecutive_failures >= CRASH_LOOP_AFTER

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        status: dict[str, object] = {
            "state": self.state.value,
            "pid": self.pid,
            "model": self.spec.served_model_name,
            "restarts": self.restarts,
            "consecutive_failures": self.consecutive_failures,
            "last_exit_code": self.last_exit_code,
            "crash_loop": self.crash_loop,
        }
        if self.state is EngineState.STARTING:
            status["phase"] = self.phase.value
            status["loading_for_s"] = round(now - self.started_at, 1)
        elif self.state is EngineState.READY:
            status["uptime_s"] = round(now - self.ready_at, 1)
        elif self.state is EngineState.CRASHED:
            status["next_start_in_s"] = round(max(0.0, self.next_start_at - now), 1)
            status["log_tail"] = list(self.tail)[-10:]
        return status

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_until(self, condition: Callable[[EngineSupervisor], bool]) -> None:
        """Wake on every change of state, phase or failure count until ``condition`` holds."""
        while not condition(self):
            await self._change.wait()

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-supervisor")

    async def stop(self) -> None:
        """SIGTERM the engine's process group, SIGKILL after the grace period; no restart afterwards."""
        self._stopping.set()
        self.state = EngineState.STOPPING
        self._changed()
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            code = await terminate(proc, self.stop_grace_s)
            self._on_event("engine_stopped", exit_code=code, pid=proc.pid)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = EngineState.STOPPED
        self._changed()

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while not self._stopping.is_set():
                exit_code = await self._run_once(session)
                if self._stopping.is_set():
                    return
                delay = self.backoff.delay(self.consecutive_failures)
                self._on_event(
                    "engine_exited",
                    level="error",
                    exit_code=exit_code,
                    pid=self.pid,
                    restart_in_s=delay,
                    consecutive_failures=self.consecutive_failures,
                    crash_loop=self.crash_loop,
                    last_lines=list(self.tail),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), max(0.0, self.next_start_at - time.monotonic()))
                if not self._stopping.is_set():
                    self.restarts += 1

    async def _run_once(self, session: aiohttp.ClientSession) -> int:
        """Start one engine process and watch it until it exits; returns its exit code."""
        self.state = EngineState.STARTING
        self.phase = LoadPhase.STARTING
        self._changed()
        self.tail.clear()
        self.started_at = time.monotonic()
        proc = await spawn(self.spec, line_limit=OUTPUT_LINE_LIMIT)
        self._proc = proc
        self.pid = proc.pid
        self._on_event(
            "engine_starting", pid=proc.pid, url=self.base_url, argv=list(self.spec.argv), restart=self.restarts
        )
        reader = asyncio.create_task(self._read_output(proc))
        probe = asyncio.create_task(self._become_ready(session))
        try:
            code = await proc.wait()
            self._ready.clear()
            if not self._stopping.is_set():
                self._mark_crashed(code)
            # Workers left behind by a crashed server hold memory (and the output pipe): end the whole group.
            await end_group(proc.pid, grace_s=5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 5.0)
        finally:
            probe.cancel()
            reader.cancel()
            proc.close_output()
        return code

    def _mark_crashed(self, exit_code: int) -> None:
        self.state = EngineState.CRASHED
        self.consecutive_failures += 1
        self.last_exit_code = exit_code
        self.next_start_at = time.monotonic() + self.backoff.delay(self.consecutive_failures)
        self._changed()

    async def _read_output(self, proc: EngineProcess) -> None:
        while True:
            try:
                raw = await proc.output.readline()
            except ValueError:  # a line longer than the pipe reader's limit: pass it on in pieces
                raw = await proc.output.read(OUTPUT_LINE_LIMIT)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            if self.state is EngineState.STARTING:
                phase = advance(self.phase, line)
                if phase is not self.phase:
                    self.phase = phase
                    self._changed()
            self._on_line(line)

    async def _become_ready(self, session: aiohttp.ClientSession) -> None:
        """Ready means: ``/health`` answers 200 and ``/v1/models`` lists the served model."""
        while not await self.probe(session):  # noqa: ASYNC110 - the engine announces readiness only over HTTP
            await asyncio.sleep(self.poll_interval_s)
        self.state = EngineState.READY
        self.phase = LoadPhase.READY
        self.ready_at = time.monotonic()
        self._changed()
        self._ready.set()
        self._on_event("engine_ready", pid=self.pid, load_s=round(self.ready_at - self.started_at, 2))
        await asyncio.sleep(self.backoff.stable_after_s)
        self.consecutive_failures = 0  # it stayed up: the next crash starts the backoff afresh
        self._changed()

    async def probe(self, session: aiohttp.ClientSession) -> bool:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            async with session.get(self.base_url + "/health", timeout=timeout) as health:
                if health.status != 200:
                    return False
            async with session.get(self.base_url + "/v1/models", timeout=timeout) as models:
                if models.status != 200:
                    return False
                listed = await models.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return any(entry.get("id") == self.spec.served_model_name for entry in listed.get("data", []))
