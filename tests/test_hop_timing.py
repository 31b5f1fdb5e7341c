"""Per-hop timing: planted delays show up in the right field of the record, and the fields agree."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from flushgate.config import Config
from flushgate.engine.command import free_port
from flushgate.server import Server
from tests.fakes import FakeUpstream, export_llm_span, sse_chunk, start_stream
from tests.managed import managed_server, supervisor_of

GUARD_S = 30
TOLERANCE = 0.10  # a planted delay must show within 10 %


def close_to(measured: float | None, planted_s: float) -> bool:
    assert measured is not None
    return abs(measured - planted_s * 1000) <= planted_s * 1000 * TOLERANCE


def records(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "request"]


def assert_consistent(record: MutableMapping[str, Any]) -> None:
    assert record["first_token_ms"] >= record["upstream_ttfb_ms"]
    assert record["last_token_ms"] >= record["first_token_ms"]
    assert record["total_ms"] >= record["last_token_ms"]
    assert sum(record["split"].values()) == pytest.approx(record["total_ms"], abs=0.01)


@pytest.fixture
async def managed(tmp_path: Path, engine_env: Path) -> AsyncIterator[Server]:
    server = await managed_server(tmp_path)
    await asyncio.wait_for(supervisor_of(server).wait_ready(), GUARD_S)
    yield server
    await server.stop()


async def chat(server: Server, plan: dict[str, float], headers: dict[str, str] | None = None) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=plan, headers=headers) as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def test_engine_queue_prefill_and_decode_land_in_the_engine_fields(managed: Server) -> None:
    plan = {"fake_queue_s": 0.6, "fake_prefill_s": 0.4, "fake_tokens": 6, "fake_token_gap_s": 0.15}
    with capture_logs() as logs:
        await chat(managed, plan, headers={"X-Request-ID": "planted-1"})
        assert managed.gateway is not None
        await managed.gateway.recorder.flush()
    (record,) = records(logs)
    split = record["split"]
    assert close_to(split["engine_queue_ms"], 0.6)
    assert close_to(split["engine_prefill_ms"], 0.4)
    assert close_to(split["engine_decode_ms"], 0.75)  # five gaps of 150 ms after the first token
    assert close_to(record["gap_p50_ms"], 0.15)
    assert record["gaps_over_100ms"] == 5
    assert record["tokens"] == 6
    assert record["decode_tok_s"] == pytest.approx(5 / 0.75, rel=TOLERANCE)
    assert close_to(record["first_token_ms"] - record["upstream_ttfb_ms"], 1.0)  # queue + prefill after headers
    assert_consistent(record)


async def test_a_slow_client_reader_shows_as_time_blocked_writing(
    fake: FakeUpstream, gateway: Server, gateway_url: str
) -> None:
    body = b"x" * (16 << 20)  # more than the kernel buffers on both sides can hold
    planted_s = 0.5

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for i in range(0, len(body), 1 << 16):
            await response.write(body[i : i + (1 << 16)])
        return response

    fake.handler = big
    port = int(gateway_url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    with capture_logs() as logs:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(planted_s)  # the planted slowness: a reader that stops reading for half a second
        received = 0
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        writer.close()
    (record,) = records(logs)
    assert received > len(body)  # the body, plus chunked framing
    assert close_to(record["write_blocked_ms"], planted_s)
    assert close_to(record["split"]["client_link_ms"], planted_s)
    assert sum(record["split"].values()) == pytest.approx(record["total_ms"], abs=0.01)


async def delaying_hop(target_port: int, delay_s: float) -> tuple[asyncio.Server, int]:
    """A TCP relay that passes request headers at once and holds everything after them for ``delay_s``."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold_body: bool) -> None:
        if hold_body:
            writer.write(await reader.readuntil(b"\r\n\r\n"))
            await writer.drain()
            await asyncio.sleep(delay_s)  # the planted delay of a slow link
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))

    hop = await asyncio.start_server(relay, "127.0.0.1", 0)
    return hop, hop.sockets[0].getsockname()[1]


async def test_a_slow_link_shows_as_client_link_time(fake: FakeUpstream, gateway: Server) -> None:
    planted_s = 0.3

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = await start_stream(request)
        await response.write(sse_chunk("hello"))
        return response

    fake.handler = answer
    hop, hop_port = await delaying_hop(gateway.port, planted_s)
    try:
        with capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{hop_port}/v1/chat/completions", data=b'{"model": "m"}') as resp,
            ):
                assert await resp.read() == sse_chunk("hello")
    finally:
        hop.close()
    (record,) = records(logs)
    assert close_to(record["body_read_ms"], planted_s)
    assert close_to(record["split"]["client_link_ms"], planted_s)
    assert record["model"] == "m"
    assert_consistent(record)


async def test_metrics_follow_prometheus_conventions_and_count_what_happened(managed: Server) -> None:
    with capture_logs() as logs:
        await chat(managed, {"fake_tokens": 4, "fake_token_gap_s": 0.01})
        assert managed.gateway is not None
        await managed.gateway.recorder.flush()
    (record,) = records(logs)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{managed.port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("flushgate_requests_total", (("api", "openai"), ("outcome", "completed")))] == 1
    assert samples[("flushgate_time_to_first_token_seconds_count", (("api", "openai"),))] == 1
    assert samples[("flushgate_upstream_ttfb_seconds_count", (("api", "openai"),))] == 1
    assert samples[("flushgate_gateway_chunk_seconds_count", ())] == record["chunks"]
    assert 1 <= samples[("flushgate_inter_token_gap_seconds_count", ())] < record["chunks"]
    assert samples[("flushgate_inflight_requests", ())] == 0
    assert samples[("flushgate_engine_restarts_total", ())] == 0
    names = {name for name, _ in samples}
    assert all(name.startswith("flushgate_") for name in names)


async def test_server_timing_and_the_opt_in_summary_comment(managed: Server) -> None:
    base = f"http://127.0.0.1:{managed.port}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/v1/chat/completions", json={"fake_tokens": 3}) as plain,
    ):
        assert "engine-ttfb;dur=" in plain.headers["Server-Timing"]
        assert b"flushgate-timing" not in await plain.read()

    body = await chat(managed, {"fake_tokens": 3, "fake_prefill_s": 0.05}, {"X-Flushgate-Timing": "summary"})
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b": flushgate-timing ")
    summary = orjson.loads(last.removeprefix(b": flushgate-timing "))
    assert summary["split"]["engine_prefill_ms"] > 0
    assert summary["tokens"] == 3

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny-model", messages=[{"role": "user", "content": "x"}], stream=True,
            extra_body={"fake_tokens": 2}, extra_headers={"X-Flushgate-Timing": "summary"},
        )  # fmt: skip
        texts = [chunk.choices[0].delta.content async for chunk in stream]
    finally:
        await client.close()
    assert texts == ["", "t0 ", "t1 "]  # the comment line is invisible to an SSE client


async def test_prompts_and_completions_are_logged_only_when_asked(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = await start_stream(request)
        await response.write(sse_chunk("secret answer"))
        return response

    fake.handler = answer
    for log_content in (False, True):
        server = Server(Config(upstream=fake.url, port=0, log_content=log_content))
        await server.start()
        try:
            with capture_logs() as logs:
                async with http.post(
                    f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b'{"prompt": "secret question"}'
                ) as resp:
                    await resp.read()
        finally:
            await server.stop()
        (record,) = records(logs)
        logged = orjson.dumps(record, default=str)
        assert (b"secret question" in logged) is log_content
        assert (b"secret answer" in logged) is log_content


async def test_with_hop_timing_off_streams_still_pass_and_are_still_recorded(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(sse_chunk("a"))
        await response.write(sse_chunk("b"))
        return response

    fake.handler = answer
    server = Server(Config(upstream=fake.url, port=0, hop_timing=False))
    await server.start()
    try:
        with capture_logs() as logs:
            async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
                assert await resp.read() == sse_chunk("a") + sse_chunk("b")
    finally:
        await server.stop()
    (record,) = records(logs)
    assert record["bytes_out"] == len(sse_chunk("a") + sse_chunk("b"))
    assert record["chunks"] == 0
    assert record["first_token_ms"] is None


async def test_an_attached_engine_can_send_its_timing_to_a_fixed_port(fake: FakeUpstream) -> None:
    port = free_port()

    async def engine(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = await start_stream(request)
        for token in ("a", "b", "c"):
            await response.write(sse_chunk(token))
        rid = request.headers["X-Request-ID"]
        timing = {"queue": 0.004, "prefill": 0.02, "decode": 0.03}
        await export_llm_span(f"http://127.0.0.1:{port}/v1/traces", f"chatcmpl-{rid}", timing, 3)
        return response

    fake.handler = engine
    server = Server(Config(upstream=fake.url, port=0, engine_traces_port=port))
    await server.start()
    try:
        with capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp,
            ):
                await resp.read()
            assert server.gateway is not None
            await server.gateway.recorder.flush()
    finally:
        await server.stop()
    (record,) = records(logs)
    assert record["split"]["engine_prefill_ms"] == pytest.approx(20.0)
    assert record["split"]["engine_queue_ms"] == pytest.approx(4.0)
    assert record["tokens"] == 3


def test_a_bulk_histogram_counts_listed_values_by_bound_and_unlisted_fast_ones_in_the_first_bucket() -> None:
    from flushgate.metrics import BulkHistogram

    histogram = BulkHistogram("x_seconds", "x", (0.001, 0.01, 0.1))
    histogram.observe_many([0.001, 0.005, 0.5, 0.02], fast=3, total=0.6)  # 0.001 is <= its bound: first bucket
    (family,) = histogram.collect()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.001": 4, "0.01": 5, "0.1": 6, "+Inf": 7}
    assert next(s.value for s in family.samples if s.name == "x_seconds_count") == 7
    assert next(s.value for s in family.samples if s.name == "x_seconds_sum") == 0.6


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["openai", "ollama"]),
            st.one_of(st.sampled_from([0.0, 0.001, 0.0025, 0.5, 60.0, 120.0]), st.floats(0, 200)),
        ),
        max_size=40,
    )
)
def test_the_labelled_histogram_and_counter_expose_what_prometheus_clients_own_would(
    observed: list[tuple[str, float]],
) -> None:
    """The same values into prometheus_client's Histogram and Counter and into the gateway's collectors: the
    same samples come out (bounds hit exactly included: le means at most), ``_created`` aside."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from flushgate.metrics import LATENCY_BUCKETS, LabelledCounter, LabelledHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "t", ["api"], buckets=LATENCY_BUCKETS, registry=theirs)
    reference_count = Counter("n", "n", ["api"], registry=theirs)
    histogram = LabelledHistogram("t_seconds", "t", ["api"], LATENCY_BUCKETS)
    count = LabelledCounter("n", "n", ["api"])
    ours.register(histogram)
    ours.register(count)
    for api, value in observed:
        reference.labels(api).observe(value)
        reference_count.labels(api).inc()
        histogram.labels(api).observe(value)
        count.labels(api).inc()

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): round(s.value, 9)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(theirs)


def test_a_labelled_metric_refuses_the_wrong_number_of_labels() -> None:
    from flushgate.metrics import LabelledCounter, LabelledHistogram

    with pytest.raises(ValueError, match="takes the labels"):
        LabelledHistogram("t_seconds", "t", ["api", "outcome"], (0.1,)).labels("openai")
    with pytest.raises(ValueError, match="takes the labels"):
        LabelledCounter("n", "n", ["engine"]).labels("a", "b")
