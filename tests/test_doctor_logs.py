"""``doctor logs`` puts each request's time in the hop that spent it, from records the real gateway wrote."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from flushgate.config import Config
from flushgate.doctor.logs_report import LogsReport, analyse_lines, render_logs
from flushgate.doctor.records import hop_parts, read_records
from flushgate.server import Server
from tests.doctor_hops import CadenceEngine
from tests.fakes import FakeUpstream
from tests.managed import managed_server, supervisor_of

GUARD_S = 30
PREFILL_S = 0.4
QUEUE_S = 0.4
READER_PAUSE_S = 0.5


def as_lines(events: Sequence[Any]) -> list[bytes]:
    """The log events as the JSON lines flushgate writes."""
    return [orjson.dumps(dict(event)) for event in events]


async def gateway_log_lines(engine: CadenceEngine, requests: Sequence[tuple[str, int]]) -> list[bytes]:
    """What a gateway in front of ``engine`` logs while serving ``(request id, max_tokens)`` requests."""
    with capture_logs() as events:
        gateway = Server(Config(upstream=engine.url, port=0))
        await gateway.start()
        try:
            async with aiohttp.ClientSession() as http:
                for request_id, max_tokens in requests:
                    body = {"model": "m", "stream": True, "max_tokens": max_tokens, "messages": []}
                    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
                    async with http.post(url, json=body, headers={"X-Request-ID": request_id}) as resp:
                        assert resp.status == 200
                        await resp.read()
        finally:
            await gateway.stop()
    return as_lines(events)


@pytest.fixture
async def slow_prefill_engine() -> AsyncIterator[CadenceEngine]:
    engine = CadenceEngine(tokens=6, step_s=0.01, prefill_s=PREFILL_S)
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def long_answer_engine() -> AsyncIterator[CadenceEngine]:
    engine = CadenceEngine(tokens=40, step_s=0.02)
    await engine.start()
    yield engine
    await engine.stop()


async def test_a_slow_first_token_makes_the_engine_dominant(slow_prefill_engine: CadenceEngine) -> None:
    lines = await gateway_log_lines(slow_prefill_engine, [(f"req-{i}", 6) for i in range(3)])
    report = analyse_lines(lines)
    assert report.records == 3
    assert report.skipped_lines > 0  # the gateway's other events
    assert report.dominant_hop == "engine"
    assert report.dominant_part == "engine"  # an attached engine reports no split of its own
    assert report.dominant_before_first_token == "rest until first token"
    before = next(s for s in report.first_token_parts if s.name == "rest until first token")
    assert before.p50 is not None
    assert PREFILL_S * 1000 * 0.95 <= before.p50 <= PREFILL_S * 1000 * 4


async def test_a_queueing_engine_shows_its_queue_as_the_largest_part(tmp_path: Path, engine_env: Path) -> None:
    plan = {"fake_queue_s": QUEUE_S, "fake_prefill_s": 0.05, "fake_tokens": 4, "fake_token_gap_s": 0.02}
    with capture_logs() as events:
        server = await managed_server(tmp_path)
        try:
            await asyncio.wait_for(supervisor_of(server).wait_ready(), GUARD_S)
            async with aiohttp.ClientSession() as http:
                for i in range(2):
                    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
                    async with http.post(url, json=plan, headers={"X-Request-ID": f"queued-{i}"}) as resp:
                        assert resp.status == 200
                        await resp.read()
            assert server.gateway is not None
            await server.gateway.recorder.flush()
        finally:
            await server.stop()
    report = analyse_lines(as_lines(events))
    assert report.records == 2
    assert report.dominant_hop == "engine"
    assert report.dominant_part == "engine queue"
    assert report.dominant_before_first_token == "engine queue"
    queue = next(s for s in report.parts if s.name == "engine queue")
    assert queue.p50 is not None
    assert QUEUE_S * 1000 * 0.9 <= queue.p50 <= QUEUE_S * 1000 * 3
    assert "split" not in report.missing_fields


async def test_a_slow_reader_makes_the_client_the_dominant_hop(
    fake: FakeUpstream, gateway: Server, gateway_url: str
) -> None:
    body = b"x" * (16 << 20)  # more than the kernel buffers on both sides hold, so the gateway's writes block

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for i in range(0, len(body), 1 << 16):
            await response.write(body[i : i + (1 << 16)])
        return response

    fake.handler = big
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect(("127.0.0.1", int(gateway_url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    with capture_logs() as events:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-reader\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(READER_PAUSE_S)  # the planted fault: a client that stops reading for a while
        while await reader.read(1 << 20):
            pass
        writer.close()
    report = analyse_lines(as_lines(events))
    assert report.dominant_hop == "client"
    assert report.dominant_part == "client link"
    assert report.worst[0].request_id == "slow-reader"
    assert report.worst[0].most_time_in == "client link"


async def test_a_long_answer_ranks_first_among_the_worst(long_answer_engine: CadenceEngine) -> None:
    lines = await gateway_log_lines(long_answer_engine, [("short", 4), ("longest", 40), ("middle", 16)])
    report = analyse_lines(lines, worst=2)
    assert [w.request_id for w in report.worst] == ["longest", "middle"]
    assert report.worst[0].most_time_in == "engine"
    assert report.worst[0].outcome == "completed"
    assert report.worst[0].status == 200
    shown = render_logs(report)
    assert "worst 2 requests:" in shown
    assert "dominant hop: engine" in shown


def test_records_from_before_the_split_are_cut_by_their_timestamps() -> None:
    older = {
        "event": "request",
        "request_id": "old",
        "status": 200,
        "outcome": "completed",
        "upstream_ttfb_ms": 5.0,
        "first_chunk_ms": 80.0,
        "last_chunk_ms": 1080.0,
        "duration_ms": 1081.0,
        "chunks": 40,
    }
    assert hop_parts(older) == {
        "engine response headers": 5.0,
        "engine to first token": 75.0,
        "engine streaming": 1000.0,
        "after last token": 1.0,
    }
    report = analyse_lines([orjson.dumps(older)])
    assert report.dominant_part == "engine streaming"
    assert report.worst[0].ttft_ms == 80.0
    assert {"split", "body_read_ms", "engine_queue_ms", "tokens"} <= set(report.missing_fields)
    assert "not in these records" in render_logs(report)


def test_lines_that_are_not_request_records_or_hold_odd_values_are_passed_over() -> None:
    lines: list[Any] = [
        b"not json at all",
        b'{"event": "listening", "url": "http://127.0.0.1:8000"}',
        b'{"event": "request", "request_id": "a", "total_ms": 120.0, "upstream_ttfb_ms": null}',
        b'{"event": "request", "request_id": "b", "total_ms": "slow", "status": 503, "outcome": "rejected"}',
        "",
        '{"event": "request", "request_id": "c", "total_ms": 80.0, "split": {"gateway_ms": 1.0, "engine_ms": 79.0}}',
    ]
    report = analyse_lines(lines)
    assert (report.records, report.lines, report.skipped_lines) == (3, 5, 2)
    assert [s.name for s in report.parts] == ["gateway", "engine"]
    assert [w.request_id for w in report.worst] == ["a", "c"]
    assert report.outcomes == {"unknown": 2, "rejected": 1}


def test_no_records_says_so() -> None:
    report: LogsReport = analyse_lines([b'{"event": "listening"}'])
    assert report.records == 0
    assert "no request records among 1 lines" in render_logs(report)


def test_only_request_events_are_records() -> None:
    lines = [b'{"event": "engine_ready"}', b'{"event": "request", "request_id": "x", "total_ms": 5}']
    assert [r["request_id"] for r in read_records(lines)] == ["x"]
