"""Real CPU vLLM servers started directly (not by flushgate), for flushgate to attach to with --upstream.

Each runs in a process group of its own, started with the same command line flushgate gives a managed engine
(the ``cpu`` preset), and bound to its own share of the machine's cores, as each engine would have its own GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from flushgate.engine.command import build_spec
from flushgate.engine.presets import get_preset

READY_TIMEOUT_S = 600.0  # two CPU vLLMs loading side by side take 55-85 s on a 2-core machine


class VllmServer:
    def __init__(self, model_dir: Path, cores: Sequence[int], log_path: Path, extra_args: Sequence[str] = ()) -> None:
        spec = build_spec(str(model_dir), python=sys.executable, preset=get_preset("cpu"))
        env = dict(spec.env)
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        self.url = spec.base_url
        self.model = spec.served_model_name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [*spec.argv, *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, deadline: float) -> None:
        """Until /v1/models answers (vLLM serves it only once the model is loaded); fails if the server exits."""
        while True:
            if self.popen.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"vLLM at {self.url} exited with {self.popen.returncode}:\n{tail}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM at {self.url} was not ready within {READY_TIMEOUT_S} s")
            time.sleep(0.5)  # a readiness poll with a deadline: vLLM announces readiness only over HTTP

    def counter(self, name: str) -> float:
        """A counter from the engine's /metrics, summed over its label sets (e.g. vllm:prefix_cache_hits)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name + "_total"
        )

    def kill(self) -> None:
        """What a crashed node or an OOM kill does: the whole engine gone at once, no goodbye."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # workers left behind, if any


def start_engines(model_dir: Path, count: int, log_dir: Path, extra_args: Sequence[str] = ()) -> list[VllmServer]:
    """``count`` engines, loading side by side, each on its share of the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    engines = []
    try:
        for i in range(count):
            share = cores[i::count] or cores
            engines.append(VllmServer(model_dir, share, log_dir / f"vllm-{i}.log", extra_args))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for engine in engines:
            engine.wait_ready(deadline)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return engines
