"""``--workers N``: several gateway processes on one port, each serving, all draining on SIGTERM, a dead one
started again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from flushgate.cli import main
from flushgate.workers import WORKER_METRICS_FLAG
from tests.fakes import FakeUpstream, sse_chunk, start_stream

REPO = Path(__file__).resolve().parents[1]
GUARD_S = 30.0


class WorkerGroup:
    """``flushgate serve --workers N`` as a child process, its JSON events (every worker's) read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.port = 0

    @classmethod
    async def start(cls, upstream: str, workers: int) -> WorkerGroup:
        clean = {key: value for key, value in os.environ.items() if not key.startswith("FLUSHGATE_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flushgate", "serve", "--upstream", upstream, "--port", "0",
            "--log-format", "json", "--workers", str(workers), "--drain-timeout", "20",
            cwd=REPO, env=clean, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        group = cls(proc)
        started = await group.event("workers")
        group.port = int(started["url"].rsplit(":", 1)[1])
        return group

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def event(self, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        """The first event ``name`` (matching ``where``) not yet returned, reading the log as far as needed."""
        for seen in self.events:
            if seen["event"] == name and where(seen) and not seen.get("_taken"):
                seen["_taken"] = True
                return seen
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), GUARD_S)
            assert line, f"the group's output ended before {name!r}"
            event: dict[str, Any] = orjson.loads(line)
            self.events.append(event)
            if event["event"] == name and where(event):
                event["_taken"] = True
                return event

    async def finish(self) -> int:
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), GUARD_S)
        self.events.extend(orjson.loads(line) for line in rest.splitlines() if line)
        return await asyncio.wait_for(self.proc.wait(), GUARD_S)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def request_id_is(request_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: bool(event["request_id"] == request_id)


async def serve_on_both_workers(group: WorkerGroup, http: aiohttp.ClientSession, tag: str) -> dict[int, int]:
    """Chats, each on a new connection (``http`` must not keep them: the kernel picks a worker for each), until
    both workers have served; how many each served, by their records."""
    served: dict[int, int] = {}
    for i in range(64):
        async with http.post(
            group.base + "/v1/chat/completions", data=b'{"model": "m"}', headers={"X-Request-ID": f"{tag}-{i}"}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"ok": True}  # the fake engine's answer
        worker = (await group.event("request", request_id_is(f"{tag}-{i}")))["worker"]
        served[worker] = served.get(worker, 0) + 1
        if len(served) == 2:
            break
    return served


def completed_by_worker(exposition: str) -> dict[int, float]:
    """``flushgate_requests_total{outcome="completed"}`` per ``worker`` label of a ``/metrics`` answer."""
    return {
        int(s.labels["worker"]): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "flushgate_requests_total" and s.labels["outcome"] == "completed"
    }


@pytest.fixture
async def group(fake: FakeUpstream) -> AsyncIterator[WorkerGroup]:
    group = await WorkerGroup.start(fake.url, 2)
    listening = [await group.event("listening") for _ in range(2)]
    assert sorted(event["worker"] for event in listening) == [0, 1]
    assert {event["url"] for event in listening} == {group.base}
    yield group
    await group.kill()


async def test_both_workers_listen_on_the_port_and_serve(group: WorkerGroup) -> None:
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time: the kernel picks a worker
    async with aiohttp.ClientSession(connector=connector) as http:
        served = await serve_on_both_workers(group, http, "w")
    assert sorted(served) == [0, 1]


async def test_metrics_answer_for_every_worker_whichever_one_the_scrape_reaches(group: WorkerGroup) -> None:
    """Each scrape, on a new connection (so the kernel picks a worker), has both workers' series, labelled, with
    the requests each one's records say it served; parsed, every family appears once."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        served = await serve_on_both_workers(group, http, "m")
        assert sorted(served) == [0, 1]
        for _ in range(6):
            async with http.get(group.base + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            families = list(text_string_to_metric_families(text))
            names = [family.name for family in families]
            assert len(names) == len(set(names))
            samples = [sample for family in families for sample in family.samples]
            inflight = {s.labels["worker"] for s in samples if s.name == "flushgate_inflight_requests"}
            assert inflight == {"0", "1"}
            assert completed_by_worker(text) == served


async def test_sigterm_drains_every_worker_and_the_group_exits_0(group: WorkerGroup, fake: FakeUpstream) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("before"))
        await release.wait()
        await response.write(sse_chunk("after") + b"data: [DONE]\n\n")
        return response

    fake.handler = held
    async with aiohttp.ClientSession() as http:
        resp = await http.post(group.base + "/v1/chat/completions", data=b"{}")
        assert (await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD_S)) == sse_chunk("before")
        group.proc.send_signal(signal.SIGTERM)
        draining = [await group.event("draining") for _ in range(2)]
        assert sorted(event["worker"] for event in draining) == [0, 1]
        assert sorted(event["inflight"] for event in draining) == [0, 1]  # the stream's worker waits for it
        release.set()
        assert await asyncio.wait_for(resp.read(), GUARD_S) == sse_chunk("after") + b"data: [DONE]\n\n"
    assert await group.finish() == 0
    assert sorted(e["worker"] for e in group.events if e["event"] == "stopped") == [0, 1]
    assert [e["signal"] for e in group.events if e["event"] == "workers_stopped"] == ["SIGTERM"]


async def test_a_worker_that_dies_is_started_again(group: WorkerGroup) -> None:
    first = next(e for e in group.events if e["event"] == "listening" and e["worker"] == 0)
    os.kill(first["pid"], signal.SIGKILL)
    exited = await group.event("worker_exited")
    assert (exited["worker"], exited["exit_code"], exited["restarting"]) == (0, -signal.SIGKILL, True)
    again = await group.event("listening", lambda e: e["worker"] == 0)
    assert again["pid"] != first["pid"]
    assert again["url"] == group.base


async def test_the_last_worker_out_removes_the_metrics_folder_when_the_first_process_was_killed(
    group: WorkerGroup,
) -> None:
    """SIGKILL leaves the first process no way to clean up: its workers get SIGTERM (they die with it), drain,
    and the last one out removes the folder their metrics sockets were in."""
    pids = [e["pid"] for e in group.events if e["event"] == "listening"]
    folders = {worker_metrics_dir(pid) for pid in pids}
    assert len(folders) == 1
    folder = folders.pop()
    assert sorted(path.name for path in folder.iterdir()) == ["0.sock", "1.sock"]
    group.proc.kill()
    assert await group.finish() == -signal.SIGKILL  # read to the end of output: every worker has exited
    assert not folder.exists()


def worker_metrics_dir(pid: int) -> Path:
    """The folder a worker was told its metrics socket goes in, from its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(WORKER_METRICS_FLAG.encode()) + 1].decode())


def test_workers_refuse_a_managed_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "/models/x", "--workers", "2"]) == 2
    assert "--workers needs --upstream or --upstream-dns" in capsys.readouterr().err


def test_workers_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--upstream", "http://127.0.0.1:9", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_merged_expositions_label_every_sample_with_its_worker_and_write_each_family_once() -> None:
    from flushgate.metrics import LATENCY_BUCKETS, Metrics
    from flushgate.worker_metrics import merge

    texts: dict[int, str] = {}
    for worker, seconds in ((0, [0.01, 0.2]), (1, [0.5])):
        metrics = Metrics(inflight=float(worker + 1).__float__)
        for value in seconds:
            metrics.requests.labels("openai", "completed").inc()
            metrics.ttft.labels("openai").observe(value)
        texts[worker] = metrics.render().decode()
    families = {family.name: family for family in text_string_to_metric_families(merge(texts).decode())}
    assert {(s.labels["worker"], s.value) for s in families["flushgate_inflight_requests"].samples} == {
        ("0", 1.0),
        ("1", 2.0),
    }
    assert {(s.labels["worker"], s.value) for s in families["flushgate_requests"].samples} == {("0", 2.0), ("1", 1.0)}
    buckets = {
        (s.labels["worker"], s.labels["le"]): s.value
        for s in families["flushgate_time_to_first_token_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert len(buckets) == 2 * (len(LATENCY_BUCKETS) + 1)
    assert (buckets[("0", "0.01")], buckets[("0", "0.25")], buckets[("1", "0.25")], buckets[("1", "0.5")]) == (
        1.0,
        2.0,
        0.0,
        1.0,
    )
