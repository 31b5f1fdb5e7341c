"""The things measured: the engine itself, and each proxy in front of it, started as pinned child processes.

Each proxy runs in its own process group so the whole tree (nginx's workers included) can be paused while
another target is measured, stopped at the end, and its CPU time read from /proc.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flushgate.bench.procstat import tree_cpu_seconds

HOST = "127.0.0.1"


class TargetError(RuntimeError):
    """A target could not be started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


Cpus = int | str | None  # one core, a taskset list such as "1-4", or None: wherever the scheduler likes


def pin_load_side() -> tuple[int | None, int | None]:
    """With two cores or more: this process (the load generator) and the engine on CPU 0, the proxy on CPU 1, as
    the benchmark pins them. Returns (load and engine CPU, proxy CPU); None, None on one core."""
    if (os.cpu_count() or 1) < 2:
        return None, None
    os.sched_setaffinity(0, {0})
    return 0, 1


def pinned(command: Sequence[str], cpu: Cpus) -> list[str]:
    """The command run on its cores with taskset, or as it is where there is no core to spare."""
    taskset = shutil.which("taskset")
    if cpu is None or taskset is None:
        return list(command)
    return [taskset, "-c", str(cpu), *command]


def core_count(cpu: Cpus) -> int:
    """How many cores a proxy pinned to ``cpu`` has (1 when unpinned: it is measured as one process)."""
    if isinstance(cpu, str) and "-" in cpu:
        first, last = cpu.split("-")
        return int(last) - int(first) + 1
    return 1


def http_status(port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status of a GET on 127.0.0.1 (readiness only; never on the measured path)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Target:
    """A URL to measure and, for a proxy, the process tree behind it."""

    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    version: str = ""

    def cpu_seconds(self) -> float | None:
        return None if self.process is None else tree_cpu_seconds(self.process.pid)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def pause(self) -> None:
        """Freeze the tree so it uses no CPU while another target is measured."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(5)

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise TargetError(f"{self.name} exited during start-up; see {self.log_path}")
            if http_status(self.port, path) == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise TargetError(f"{self.name} was not ready on port {self.port} within {timeout_s:g} s; see {self.log_path}")


def _spawn(command: list[str], log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: paused, resumed and stopped as a whole
    )


def start_engine(workdir: Path, cpu: Cpus) -> Target:
    """The fake engine, pinned beside the load generator; its port comes back on its first line of output."""
    command = pinned([sys.executable, "-m", "flushgate.bench.engine", "--port", "0"], cpu)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("listening "):
        process.kill()
        raise TargetError(f"the fake engine did not start: {line!r}")
    return Target("engine", int(line.split()[1]), process, workdir / "engine.log")


# Both proxies keep an idle engine connection this long: nginx's default for an upstream's keepalive_timeout, and
# flushgate's for the engines it manages. The benchmark's engine closes none (a managed vLLM keeps one 61 s).
ENGINE_KEEPALIVE_S = 60.0


def flushgate_tuning(cores: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The flags that shape how flushgate runs (named in the report's version line): one worker per core, idle
    engine connections kept as nginx keeps them; ``extra_args`` last, so they win."""
    workers = ["--workers", str(cores)] if cores > 1 else []
    return [*workers, "--engine-keepalive", f"{ENGINE_KEEPALIVE_S:g}", *extra_args]


def flushgate_serve_args(ports: Sequence[int], port: int, cores: int, extra_args: Sequence[str] = ()) -> list[str]:
    """``flushgate serve`` attached to each engine port, listening on ``port``, tuned by ``flushgate_tuning``."""
    return [
        "serve",
        *(arg for each in ports for arg in ("--upstream", f"http://{HOST}:{each}")),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-format",
        "json",
        *flushgate_tuning(cores, extra_args),
    ]


def start_flushgate(
    workdir: Path,
    engine_port: int | Sequence[int],
    cpu: Cpus,
    log_to: Path | None,
    extra_args: Sequence[str] = (),
    name: str = "flushgate",
) -> Target:
    """flushgate attached to the engine, or to each of several engines (one ``--upstream`` per port); with
    several cores, one worker per core (``--workers``)."""
    port = free_port()
    log_path = log_to or Path(os.devnull)
    ports = [engine_port] if isinstance(engine_port, int) else list(engine_port)
    cores = core_count(cpu)
    command = pinned([sys.executable, "-m", "flushgate", *flushgate_serve_args(ports, port, cores, extra_args)], cpu)
    with log_path.open("ab") as log:
        process = _spawn(command, log)
    from flushgate import __version__

    version = " ".join(["flushgate", __version__, *flushgate_tuning(cores, extra_args)])
    target = Target(name, port, process, log_path, version)
    target.wait_ready("/healthz", 30)
    return target


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    upstream engine {{
{servers}        keepalive 512;
        keepalive_timeout {keepalive_s:g}s;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_config(workdir: Path, engine_port: int | Sequence[int], port: int, workers: int = 1) -> str:
    """A reverse proxy with buffering off and a keep-alive HTTP/1.1 pool to the engine: the C reference.

    With several engines, nginx's ``least_conn`` spreads the streams, as flushgate's least-outstanding does."""
    ports = [engine_port] if isinstance(engine_port, int) else list(engine_port)
    servers = "".join(f"        server {HOST}:{each};\n" for each in ports)
    if len(ports) > 1:
        servers = "        least_conn;\n" + servers
    return NGINX_CONF.format(
        workdir=workdir, host=HOST, servers=servers, port=port, workers=workers, keepalive_s=ENGINE_KEEPALIVE_S
    )


def _version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, timeout=60, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return text[-1] if text else "unknown"


def start_nginx(workdir: Path, engine_port: int | Sequence[int], cpu: Cpus, nginx: str, name: str = "nginx") -> Target:
    """nginx with ``nginx_config``; its configuration, pid file and temporary files live in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, engine_port, port, core_count(cpu)))
    log_path = workdir / "nginx.out"
    with log_path.open("ab") as log:
        process = _spawn(pinned([nginx, "-p", str(workdir), "-c", str(conf), "-e", "stderr"], cpu), log)
    target = Target(name, port, process, log_path, _version([nginx, "-v"]))
    target.wait_ready("/health", 30)
    return target


def litellm_config(engine_port: int, models: Sequence[str]) -> str:
    """An OpenAI-compatible pass-through: every model name routes to the fake engine, nothing else is on."""
    lines = ["model_list:"]
    for model in models:
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: http://{HOST}:{engine_port}/v1",
            "      api_key: bench-no-key",
        ]
    return "\n".join(lines) + "\n"


def litellm_env(master_key: str) -> dict[str, str]:
    """No database, no telemetry, no network: the bundled model-cost map instead of a download.

    LiteLLM refuses to start without a master key; with one (and no database) it checks each request's key.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY_DISABLED="true",
        NO_PROXY="*",
        LITELLM_MASTER_KEY=master_key,
    )
    return env


_PRINT_LITELLM_VERSION = "import importlib.metadata as m; print(m.version('litellm'))"


def start_litellm(
    workdir: Path, engine_port: int, cpu: Cpus, litellm: str, models: Sequence[str], master_key: str
) -> Target:
    port = free_port()
    conf = workdir / "litellm.yaml"
    conf.write_text(litellm_config(engine_port, models))
    log_path = workdir / "litellm.out"
    cores = core_count(cpu)
    workers = ["--num_workers", str(cores)] if cores > 1 else []
    command = pinned([litellm, "--config", str(conf), "--host", HOST, "--port", str(port), *workers], cpu)
    with log_path.open("ab") as log:
        process = _spawn(command, log, litellm_env(master_key))
    version = _version([str(Path(litellm).with_name("python")), "-c", _PRINT_LITELLM_VERSION])
    target = Target("litellm", port, process, log_path, f"litellm {version}")
    target.wait_ready("/health/liveliness", 120)
    return target
