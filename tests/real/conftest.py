"""A flushgate managing a real vLLM on the CPU, for tests that need the real engine.

The gateway runs as its own process, as a user runs it; its JSON event lines are collected by a thread so tests
can wait on events (``engine_ready``, ``engine_exited``, ...) instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("FLUSHGATE_TEST_MODEL", ROOT / ".cache" / "models" / "smollm2-135m-instruct"))
ENGINE_READY_TIMEOUT_S = 600.0  # CPU vLLM start-up takes 25-90 s; generous for a loaded CI machine


class GatewayProcess:
    """``flushgate serve`` as a child process, with its structured events readable as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "flushgate", "serve", "--port", "0", "--log-format", "json", *args],
            stdout=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_event("listening", timeout_s=60)
        self.url: str = listening["url"]

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                event = {"event": "unparsed", "line": raw.decode("utf-8", "replace")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "stdout_closed"})
            self._changed.notify_all()

    def wait_event(
        self,
        name: str,
        *,
        after: int = 0,
        timeout_s: float = ENGINE_READY_TIMEOUT_S,
        where: Callable[[dict[str, Any]], bool] = lambda event: True,
    ) -> dict[str, Any]:
        """The first event called ``name`` (and matching ``where``) at index >= ``after``; fails if the process
        ends first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if event.get("event") == name and where(event):
                        return event
                    if event.get("event") == "stdout_closed":
                        raise AssertionError(f"gateway exited before {name!r}; last events: {self.events[-5:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {name!r} event within {timeout_s} s; last events: {self.events[-5:]}")
                self._changed.wait(left)

    def mark(self) -> int:
        """An index to pass as ``after=`` so a later wait only sees newer events."""
        with self._changed:
            return len(self.events)

    @property
    def engine(self) -> dict[str, Any]:
        """The latest ``engine_starting`` event: pid, url and command line of the current engine."""
        with self._changed:
            return next(e for e in reversed(self.events) if e.get("event") == "engine_starting")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 120) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout_s)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()


def live_group_members(pgid: int) -> list[int]:
    """Processes (not zombies) still in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def engine_gauge(metrics_text: str, name: str) -> float:
    """Sum of a vLLM gauge over its label sets (``vllm:num_requests_running``, ...)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def start_managed(model_dir: Path = MODEL_DIR, *args: str) -> GatewayProcess:
    from flushgate.engine.embedded_model import ensure_smollm2

    if model_dir == MODEL_DIR and not model_dir.exists():
        ensure_smollm2(model_dir)
    gateway = GatewayProcess("--model", str(model_dir), "--preset", "cpu", *args)
    try:
        gateway.wait_event("engine_ready")
    except BaseException:
        gateway.stop()  # never leave a gateway and its engine behind
        raise
    return gateway


@pytest.fixture(scope="session")
def smol_gateway() -> Iterator[GatewayProcess]:
    """One shared flushgate + vLLM (SmolLM2-135M-Instruct) for the non-destructive real-engine tests."""
    gateway = start_managed()
    yield gateway
    gateway.stop()
