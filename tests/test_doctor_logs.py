"""``doctor logs`` puts a request's time in the stage that spent it, from the gateway's own records."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from flushgate.config import Config
from flushgate.doctor.logs_report import LogsReport, analyse_lines, render_logs
from flushgate.doctor.records import read_records, stage_times
from flushgate.server import Server
from tests.doctor_hops import CadenceEngine

PREFILL_S = 0.4


async def gateway_log_lines(engine: CadenceEngine, requests: Sequence[tuple[str, int]]) -> list[bytes]:
    """The JSON lines a gateway in front of ``engine`` logs while serving ``(request id, max_tokens)`` requests."""
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
    return [orjson.dumps(event) for event in events]


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


async def test_a_slow_first_token_puts_the_engine_before_the_first_token_on_top(
    slow_prefill_engine: CadenceEngine,
) -> None:
    lines = await gateway_log_lines(slow_prefill_engine, [(f"req-{i}", 6) for i in range(3)])
    report = analyse_lines(lines)
    assert report.records == 3
    assert report.skipped_lines > 0  # the gateway's other events
    assert report.dominant_hop == "engine"
    assert report.dominant_stage == "to first token"
    assert report.dominant_before_first_token == "to first token"
    stage = next(s for s in report.stages if s.name == "to first token")
    assert stage.p50 is not None
    assert PREFILL_S * 1000 * 0.95 <= stage.p50 <= PREFILL_S * 1000 * 4


async def test_a_long_answer_puts_decode_on_top_and_ranks_the_longest_first(
    long_answer_engine: CadenceEngine,
) -> None:
    lines = await gateway_log_lines(long_answer_engine, [("short", 4), ("longest", 40), ("middle", 16)])
    report = analyse_lines(lines, worst=2)
    assert report.dominant_stage == "engine decode"
    assert [w.request_id for w in report.worst] == ["longest", "middle"]
    assert report.worst[0].dominant_stage == "engine decode"
    assert report.worst[0].outcome == "completed"
    assert report.worst[0].status == 200


def test_write_blocked_time_is_the_client_s_and_can_dominate() -> None:
    slow_reader = {
        "event": "request",
        "request_id": "slow-reader",
        "outcome": "completed",
        "status": 200,
        "body_read_ms": 1.0,
        "upstream_connect_ms": 0.5,
        "upstream_ttfb_ms": 4.0,
        "engine_queue_ms": 10.0,
        "engine_prefill_ms": 30.0,
        "first_token_ms": 50.0,
        "last_token_ms": 2050.0,
        "engine_decode_ms": 400.0,
        "write_blocked_ms": 1500.0,
        "total_ms": 2060.0,
        "gap_max_ms": 700.0,
    }
    times = stage_times(slow_reader)
    assert times == {
        "client upload": 1.0,
        "connect to engine": 0.5,
        "engine response headers": 2.5,
        "engine queue": 10.0,
        "engine prefill": 30.0,
        "to first token": 6.0,
        "engine decode": 400.0,
        "relay while streaming": 100.0,
        "client reading (writes blocked)": 1500.0,
        "after last token": 10.0,
    }
    assert sum(times.values()) == slow_reader["total_ms"]
    report = analyse_lines([orjson.dumps(slow_reader)])
    assert report.dominant_hop == "client"
    assert report.dominant_stage == "client reading (writes blocked)"
    assert report.dominant_before_first_token == "engine prefill"
    assert report.missing_fields == ["gap_p99_ms", "tokens"]


def test_records_with_few_or_odd_fields_are_read_without_guessing() -> None:
    lines: list[Any] = [
        b"not json at all",
        b'{"event": "listening", "url": "http://127.0.0.1:8000"}',
        b'{"event": "request", "request_id": "a", "duration_ms": 120.0, "upstream_ttfb_ms": null}',
        b'{"event": "request", "request_id": "b", "duration_ms": "slow", "status": 503, "outcome": "rejected"}',
        "",
        '{"event": "request", "request_id": "c", "timings": {"total_ms": 80.0, "upstream_ttfb_ms": 30.0}}',
    ]
    report = analyse_lines(lines)
    assert (report.records, report.lines, report.skipped_lines) == (3, 5, 2)
    assert [s.name for s in report.stages] == ["engine response headers"]
    assert [w.request_id for w in report.worst] == ["a", "c"]
    assert "first_token_ms" in report.missing_fields
    assert report.outcomes == {"unknown": 2, "rejected": 1}
    shown = render_logs(report)
    assert "engine response headers" in shown
    assert "not in these records" in shown


def test_no_records_says_so() -> None:
    report: LogsReport = analyse_lines([b'{"event": "listening"}'])
    assert report.records == 0
    assert "no request records among 1 lines" in render_logs(report)


def test_only_request_events_are_records() -> None:
    lines = [b'{"event": "engine_ready"}', b'{"event": "request", "request_id": "x", "total_ms": 5}']
    assert [r["request_id"] for r in read_records(lines)] == ["x"]
