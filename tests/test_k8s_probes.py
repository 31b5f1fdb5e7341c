"""The rendered manifests' flags, probes and drain, tried on the real ``python -m flushgate serve``.

flushgate is started with the flushgate container's args and the FLUSHGATE_* variables the kubelet would give
it, with only what must be local swapped: the engine (a fake upstream on 127.0.0.1 for the sidecar, the
stand-in vLLM of tests/fake_vllm for the managed engine), the listening address (127.0.0.1, not all
interfaces) and the port (0, read back from the log, so that no fixed port can clash). That the probes' port is
the one ``--port`` names is checked on the manifests themselves (tests/test_k8s_manifests.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from flushgate.engine.presets import PRESETS
from tests.fakes import FakeUpstream, sse_chunk, start_stream
from tests.k8s_manifests import (
    GATEWAY_CLOSE_S,
    PROBES,
    REPO,
    Manifest,
    container,
    flag,
    kubelet_env,
    one,
    overlay,
    overlay_with_components,
    pod_spec,
    with_flags,
)

FAKE_VLLM = REPO / "tests" / "fake_vllm"
GUARD_S = 30.0


class Gateway:
    """A ``flushgate serve`` child process whose JSON log events are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.port = 0

    @classmethod
    async def start(cls, args: list[str], env: dict[str, str]) -> Gateway:
        clean = {key: value for key, value in os.environ.items() if not key.startswith("FLUSHGATE_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flushgate", "serve", *args,
            cwd=REPO, env={**clean, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        gateway = cls(proc)
        listening = await gateway.event("listening")
        gateway.port = int(listening["url"].rsplit(":", 1)[1])
        return gateway

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def event(self, name: str) -> dict[str, Any]:
        """Read the log until the event ``name``; fail with the process's stderr if it exits first."""
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), GUARD_S)
            if not line:
                assert self.proc.stderr is not None
                error = await self.proc.stderr.read()
                raise AssertionError(f"flushgate exited before {name!r}: {error.decode(errors='replace')}")
            event: dict[str, Any] = orjson.loads(line)
            self.events.append(event)
            if event["event"] == name:
                return event

    async def stop(self) -> int:
        """SIGTERM, as the kubelet sends it, then read the log to its end and return the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.finish()

    async def finish(self) -> int:
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), GUARD_S)
        self.events.extend(orjson.loads(line) for line in rest.splitlines() if line)
        return await asyncio.wait_for(self.proc.wait(), GUARD_S)


def flushgate_container(docs: list[Manifest]) -> Manifest:
    return container(pod_spec(docs), "flushgate")


def probe_paths(docs: list[Manifest]) -> dict[str, str]:
    flushgate = flushgate_container(docs)
    return {kind: flushgate[kind]["httpGet"]["path"] for kind in PROBES}


def gateway_env(docs: list[Manifest]) -> dict[str, str]:
    """The FLUSHGATE_* settings the kubelet would set; others (HOME, HF_HOME) name paths inside the container."""
    env = kubelet_env(docs, flushgate_container(docs))
    return {key: value for key, value in env.items() if key.startswith("FLUSHGATE_")}


async def status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S)) as session:
        yield session


@pytest.fixture
async def engine() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def start_sidecar_gateway(engine: FakeUpstream) -> Gateway:
    docs = overlay("sidecar")
    args = with_flags(flushgate_container(docs)["args"], upstream=engine.url, host="127.0.0.1", port="0")
    return await Gateway.start(args, gateway_env(docs))


async def test_the_sidecar_gateway_answers_every_probe_path_of_its_manifest(
    engine: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    paths = probe_paths(overlay("sidecar"))
    gateway = await start_sidecar_gateway(engine)
    try:
        answers = {kind: await status(http, gateway.base + path) for kind, path in paths.items()}
    finally:
        assert await gateway.stop() == 0
    assert answers == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
    assert [entry.raw_path for entry in engine.seen] == ["/health", "/health"]  # readiness follows vLLM's /health


async def test_the_managed_gateway_holds_the_startup_probe_while_the_model_loads_and_passes_it_once_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    docs = overlay("managed")
    model = tmp_path / "model"
    model.mkdir()
    gate = tmp_path / "loaded"
    record = tmp_path / "engine-events"
    monkeypatch.setenv("PYTHONPATH", f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_ENGINE_GATE", str(gate))
    monkeypatch.setenv("FAKE_ENGINE_RECORD", str(record))
    args = with_flags(flushgate_container(docs)["args"], model=str(model), host="127.0.0.1", port="0")
    paths = probe_paths(docs)
    gateway = await Gateway.start(args, gateway_env(docs))
    try:
        await gateway.event("engine_starting")
        loading = {kind: await status(http, gateway.base + path) for kind, path in paths.items()}
        gate.touch()
        await gateway.event("engine_ready")
        ready = {kind: await status(http, gateway.base + path) for kind, path in paths.items()}
    finally:
        exit_code = await gateway.stop()
    assert loading == {"startupProbe": 503, "readinessProbe": 503, "livenessProbe": 200}
    assert ready == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
    assert exit_code == 0
    assert "engine_stopped" in [event["event"] for event in gateway.events]
    preset = PRESETS[flag(flushgate_container(docs)["args"], "--preset") or ""]
    assert f"args {' '.join(preset.args)}" in record.read_text().splitlines()


async def test_on_sigterm_readiness_fails_at_once_while_liveness_holds_until_streams_have_drained(
    engine: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """So the pod leaves the Service's endpoints, and the kubelet does not restart flushgate mid-drain."""
    release = asyncio.Event()

    async def held_stream(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="")
        response = await start_stream(request)
        await response.write(sse_chunk("first"))
        await release.wait()
        await response.write(sse_chunk("last") + b"data: [DONE]\n\n")
        return response

    engine.handler = held_stream
    docs = overlay("sidecar")
    paths = probe_paths(docs)
    drain_timeout = float(flag(flushgate_container(docs)["args"], "--drain-timeout") or 0)
    gateway = await start_sidecar_gateway(engine)
    try:
        async with http.post(gateway.base + "/v1/chat/completions", json={"stream": True}) as stream:
            assert (await stream.content.readuntil(b"\n\n")).startswith(b"data: ")
            gateway.proc.send_signal(signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + GUARD_S
            while await status(http, gateway.base + paths["readinessProbe"]) != 503:
                assert asyncio.get_running_loop().time() < deadline, "readiness stayed 200 after SIGTERM"
                await asyncio.sleep(0.02)  # the drain begins when the child handles the signal; nothing announces it
            assert await status(http, gateway.base + paths["livenessProbe"]) == 200
            release.set()
            rest = await stream.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(gateway.finish(), drain_timeout) == 0
    finally:
        release.set()
        await gateway.stop()
    assert "drained" in [event["event"] for event in gateway.events]


async def test_a_stream_that_outlasts_the_drain_is_cut_visibly_and_flushgate_exits_within_its_budget(
    engine: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """What a rollout does to an answer longer than --drain-timeout (shortened here to keep the test quick): the
    client sees a truncated response, never a complete-looking one, and flushgate is gone within the drain timeout
    plus the close allowance the grace period is planned with."""

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="")
        response = await start_stream(request)
        while True:
            await response.write(sse_chunk("more"))
            await asyncio.sleep(0.05)  # pacing of the fake engine's tokens

    engine.handler = endless
    docs = overlay("sidecar")
    drain_s = 1.0
    args = with_flags(
        flushgate_container(docs)["args"], upstream=engine.url, host="127.0.0.1", port="0", drain_timeout=str(drain_s)
    )
    gateway = await Gateway.start(args, gateway_env(docs))
    loop = asyncio.get_running_loop()
    try:
        async with http.post(gateway.base + "/v1/chat/completions", json={"stream": True}) as stream:
            assert (await stream.content.readuntil(b"\n\n")).startswith(b"data: ")
            signalled = loop.time()
            gateway.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await stream.content.read()
        exit_code = await gateway.finish()
        took = loop.time() - signalled
    finally:
        await gateway.stop()
    assert exit_code == 0
    assert drain_s <= took <= drain_s + GATEWAY_CLOSE_S
    assert "drain_timeout" in [event["event"] for event in gateway.events]


async def test_the_scrape_path_serves_prometheus_metrics_with_the_gauge_the_hpa_example_scales_on(
    engine: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    docs = overlay_with_components("sidecar", ["hpa-inflight"], tmp_path)
    path = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    (metric,) = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    gateway = await start_sidecar_gateway(engine)
    try:
        async with http.get(gateway.base + path) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            lines = (await resp.text()).splitlines()
    finally:
        await gateway.stop()
    assert f"# TYPE {name} gauge" in lines  # a per-pod value the HPA can average
    assert any(line.startswith(name + " ") for line in lines)
