"""``--workers N``: N gateway processes on one port, kept running by this one.

One Python process forwards chunks on one core. With ``--workers N`` each worker is a whole gateway (its own
connection pool, health checks, metrics and records, every log event tagged ``worker``) listening on the same
port with SO_REUSEPORT, and the kernel spreads new connections over them; ``/metrics`` answers for all of them
(flushgate/worker_metrics.py). This process only starts them, starts again one that dies, and passes SIGTERM or
SIGINT on so that every worker drains before it exits.

Only for gateways in front of engines they do not manage (``--upstream``, ``--upstream-dns``): a managed engine
is supervised by one process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from flushgate.config import Config
from flushgate.engine.process import die_with_parent
from flushgate.logs import get_logger

WORKER_INDEX_FLAG = "--worker-index"
WORKER_METRICS_FLAG = "--worker-metrics-dir"  # each worker's metrics socket is there (flushgate/worker_metrics.py)
QUICK_EXIT_S = 5.0  # a worker that dies sooner than this after starting counts towards giving up
GIVE_UP_AFTER = 5  # quick deaths in a row of one worker before the whole group stops


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: it picks the port when ``port`` is 0 and holds it while the
    workers bind theirs (connections go only to listening sockets)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Workers:
    def __init__(self, argv: Sequence[str], config: Config) -> None:
        self.argv = list(argv)
        self.config = config
        self.log = get_logger("workers")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # worker index -> process
        self.started: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.stopping: signal.Signals | None = None
        self.metrics_dir = ""

    def command(self, index: int, port: int) -> list[str]:
        # argparse keeps the last value given, so these override whatever the user's arguments said.
        return [
            sys.executable, "-m", "flushgate", "serve", *self.argv,
            "--workers", "1", "--port", str(port), WORKER_INDEX_FLAG, str(index), WORKER_METRICS_FLAG, self.metrics_dir,
        ]  # fmt: skip

    def spawn(self, index: int, port: int) -> None:
        self.procs[index] = subprocess.Popen(self.command(index, port), preexec_fn=die_with_parent())
        self.started[index] = time.monotonic()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = signal.Signals(signum)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        """Start the workers and wait; returns the exit code for the whole group."""
        reserved = reserve_port(self.config.host, self.config.port)
        port = reserved.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="flushgate-workers-")  # 0700: the group's alone
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        self.log.info("workers", count=self.config.workers, url=f"http://{self.config.host}:{port}", pid=os.getpid())
        try:
            for index in range(self.config.workers):
                self.spawn(index, port)
            return self._wait(port)
        finally:
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _wait(self, port: int) -> int:
        failed = 0
        while self.procs:
            pid, status = os.wait()  # returns when a worker ends; signals are handled in between
            index = next((i for i, proc in self.procs.items() if proc.pid == pid), None)
            if index is None:
                continue
            proc = self.procs.pop(index)
            proc.returncode = os.waitstatus_to_exitcode(status)
            code = proc.returncode
            if self.stopping is not None:
                failed = failed or (code != 0)
                continue
            lived = time.monotonic() - self.started[index]
            self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if lived < QUICK_EXIT_S else 0
            fields: dict[str, Any] = {"worker": index, "exit_code": code, "lived_s": round(lived, 1)}
            if self.quick_deaths[index] >= GIVE_UP_AFTER:
                self.log.error("worker_crash_loop", **fields, deaths=self.quick_deaths[index])
                self.on_signal(signal.SIGTERM, None)
                failed = 1
                continue
            self.log.warning("worker_exited", **fields, restarting=True)
            self.spawn(index, port)
        self.log.info("workers_stopped", signal=self.stopping.name if self.stopping else None)
        return 1 if failed else 0


def run_workers(argv: Sequence[str], config: Config) -> int:
    return Workers(argv, config).run()
