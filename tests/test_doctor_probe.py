"""``doctor probe`` names each planted fault from measured arrivals, and finds nothing wrong with clean paths.

One probe runs over a fake engine with a known cadence and a hop per fault; the tests then read its verdicts.
The planted faults are far from the thresholds (whole seconds of holding against a 20 ms token step), so a busy
machine moves the numbers but not the verdicts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from flushgate.config import Config
from flushgate.doctor.probe import Path, PathResult, ProbeReport, ProbeSettings, probe
from flushgate.doctor.render import render
from flushgate.doctor.verdicts import SLOW_RATIO
from flushgate.server import Server
from tests.doctor_hops import (
    CadenceEngine,
    Hop,
    fixed_blocks,
    flush_every,
    gzip_relay,
    hold_all,
    hold_first,
    idle_cut,
    pass_through,
    throttle,
)

STEP_S = 0.02
TOKENS = 32
BLOCK = 1024
BATCH_PERIOD_S = 0.1
HOLD_FIRST_S = 0.4
LATE_S = 0.5
SLOW_BYTES_PER_S = 3000.0  # the engine sends ~9 kB/s


def chat_path(name: str, url: str) -> Path:
    return Path(name, url + "/v1/chat/completions")


def path(report: ProbeReport, name: str) -> PathResult:
    return next(result for result in report.paths if result.name == name)


def kinds(result: PathResult) -> set[str]:
    return {finding.kind for finding in result.findings}


def text(result: PathResult, kind: str) -> str:
    return next(finding.text for finding in result.findings if finding.kind == kind)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def planted() -> AsyncIterator[ProbeReport]:
    engine = CadenceEngine(tokens=TOKENS, step_s=STEP_S)
    await engine.start()
    gateway = Server(Config(upstream=engine.url, port=0))
    await gateway.start()
    hops = {
        "whole": Hop(engine.url, hold_all),
        "blocks": Hop(engine.url, fixed_blocks(BLOCK)),
        "held-start": Hop(engine.url, hold_first(HOLD_FIRST_S)),
        "batching": Hop(engine.url, flush_every(BATCH_PERIOD_S)),
        "gzip-flushed": Hop(engine.url, gzip_relay(flush_each=True), {"Content-Encoding": "gzip"}),
        "gzip-held": Hop(engine.url, gzip_relay(flush_each=False), {"Content-Encoding": "gzip"}),
        "slow": Hop(engine.url, throttle(SLOW_BYTES_PER_S)),
        "late": Hop(engine.url, pass_through, delay_request_s=LATE_S),
        "refused": Hop(engine.url, pass_through, status=502),
        "plain": Hop(engine.url, pass_through),
    }
    for hop in hops.values():
        await hop.start()
    paths = [
        chat_path("engine", engine.url),
        chat_path("flushgate", f"http://127.0.0.1:{gateway.port}"),
        *(chat_path(name, hop.url) for name, hop in hops.items()),
    ]
    try:
        yield await probe(paths, ProbeSettings(requests=3, warmup=0, max_tokens=TOKENS))
    finally:
        for hop in hops.values():
            await hop.stop()
        await gateway.stop()
        await engine.stop()


def test_the_reference_cadence_is_the_engine_step(planted: ProbeReport) -> None:
    assert STEP_S * 1000 * 0.8 <= planted.engine.gap_ms <= STEP_S * 1000 * 3
    assert planted.paths[0].reference
    assert path(planted, "engine").measures.tokens == TOKENS


@pytest.mark.parametrize("name", ["engine", "flushgate", "plain"])
def test_clean_paths_raise_no_alarm(planted: ProbeReport, name: str) -> None:
    result = path(planted, name)
    assert result.verdict == "clean", [f.text for f in result.findings]
    assert result.measures.tokens == TOKENS
    assert result.measures.tokens_per_read == pytest.approx(1.0, abs=0.2)


def test_a_hop_holding_the_whole_answer_is_buffering(planted: ProbeReport) -> None:
    result = path(planted, "whole")
    assert kinds(result) == {"buffering"}
    evidence = text(result, "buffering")
    assert evidence.startswith(f"buffering: {TOKENS} tokens arrived within ")
    assert "the whole answer was held until it was complete" in evidence
    assert result.measures.ttft_ms is not None
    assert result.measures.ttft_ms >= TOKENS * STEP_S * 1000 * 0.9


def test_a_size_limited_buffer_is_buffering_in_blocks_that_cut_events(planted: ProbeReport) -> None:
    result = path(planted, "blocks")
    assert kinds(result) == {"buffering"}
    assert f"released in blocks of ~{BLOCK} bytes that cut events in two" in text(result, "buffering")


def test_a_time_threshold_buffer_is_buffering_of_the_first_tokens(planted: ProbeReport) -> None:
    result = path(planted, "held-start")
    assert kinds(result) == {"buffering"}
    evidence = text(result, "buffering")
    assert "were held, then they flowed" in evidence
    held = int(evidence.split("buffering: ")[1].split(" tokens")[0])
    assert 8 <= held < TOKENS


def test_periodic_flushes_are_named_batching_with_their_period(planted: ProbeReport) -> None:
    result = path(planted, "batching")
    assert kinds(result) == {"batching"}
    evidence = text(result, "batching")
    assert evidence.endswith("(a batching hop)")
    period = float(evidence.split(" every ")[1].split(" ms")[0])
    assert BATCH_PERIOD_S * 1000 * 0.7 <= period <= BATCH_PERIOD_S * 1000 * 2


def test_gzip_that_flushes_each_event_is_only_gzip(planted: ProbeReport) -> None:
    result = path(planted, "gzip-flushed")
    assert kinds(result) == {"compression"}
    assert result.verdict == "gzip"
    assert text(result, "compression").startswith("gzip on an event stream (Content-Encoding: gzip")
    assert result.measures.tokens == TOKENS  # decoded, so the timing is still known


def test_gzip_that_holds_the_answer_is_gzip_and_buffering(planted: ProbeReport) -> None:
    result = path(planted, "gzip-held")
    assert kinds(result) == {"compression", "buffering"}
    assert result.verdict == "gzip, buffering"


def test_a_hop_slower_than_the_engine_is_slow(planted: ProbeReport) -> None:
    result = path(planted, "slow")
    assert kinds(result) == {"slow"}
    assert result.measures.tok_s is not None
    assert planted.engine.tok_s is not None
    assert result.measures.tok_s < SLOW_RATIO * planted.engine.tok_s
    assert text(result, "slow").startswith("slow: ")


def test_a_hop_that_delays_the_answer_is_a_late_start(planted: ProbeReport) -> None:
    result = path(planted, "late")
    assert kinds(result) == {"late_start"}
    assert result.measures.ttft_ms is not None
    assert result.measures.ttft_ms >= LATE_S * 1000


def test_an_error_status_is_reported_with_its_body(planted: ProbeReport) -> None:
    result = path(planted, "refused")
    assert kinds(result) == {"http_error"}
    assert text(result, "http_error").startswith("HTTP 502: ")
    assert "planted failure" in text(result, "http_error")


def test_the_terminal_report_has_a_row_evidence_and_a_timeline_per_path(planted: ProbeReport) -> None:
    shown = render(planted)
    table, _, rest = shown.partition("engine cadence, measured on engine:")
    assert rest
    for result in planted.paths:
        row = next(line for line in table.splitlines() if line.startswith(result.name + " "))
        assert row.rstrip().endswith(result.verdict)
        assert any(line.startswith(result.name) and "|" in line for line in rest.splitlines())
    assert text(path(planted, "whole"), "buffering") in rest


@pytest.fixture
async def paused_engine() -> AsyncIterator[CadenceEngine]:
    engine = CadenceEngine(tokens=16, step_s=STEP_S, pause_after=8, pause_s=0.8)
    await engine.start()
    yield engine
    await engine.stop()


async def test_a_cut_after_silence_is_an_idle_timeout_and_the_pause_alone_is_not(
    paused_engine: CadenceEngine,
) -> None:
    gateway = Server(Config(upstream=paused_engine.url, port=0))
    await gateway.start()
    cutting = Hop(paused_engine.url, idle_cut(0.3))
    await cutting.start()
    try:
        report = await probe(
            [
                chat_path("engine", paused_engine.url),
                chat_path("flushgate", f"http://127.0.0.1:{gateway.port}"),
                chat_path("cutting", cutting.url),
            ],
            ProbeSettings(requests=3, warmup=0),
        )
    finally:
        await cutting.stop()
        await gateway.stop()
    assert path(report, "engine").verdict == "clean"
    assert path(report, "flushgate").verdict == "clean"
    result = path(report, "cutting")
    assert kinds(result) == {"idle_cut"}
    evidence = text(result, "idle_cut")
    assert evidence.startswith("stream cut by an idle timeout at ")
    silence_ms = float(evidence.split(" at ")[1].split(" ms")[0])
    assert 300 <= silence_ms <= 800
    assert "(8 tokens in)" in evidence  # the pause comes before the ninth
    assert "the engine paused up to" in evidence


async def test_ollama_streams_are_judged_the_same_way() -> None:
    engine = CadenceEngine(tokens=TOKENS, step_s=STEP_S)
    await engine.start()
    holding = Hop(engine.url, hold_all)
    await holding.start()
    try:
        report = await probe(
            [Path.parse(f"engine={engine.url}", "ollama"), Path.parse(f"holding={holding.url}", "ollama")],
            ProbeSettings(api="ollama", model="cadence-model", requests=3, warmup=0, max_tokens=TOKENS),
        )
    finally:
        await holding.stop()
        await engine.stop()
    assert path(report, "engine").url.endswith("/api/chat")
    assert path(report, "engine").verdict == "clean"
    assert path(report, "engine").measures.tokens == TOKENS
    assert path(report, "holding").verdict == "buffering"


async def test_a_stream_without_text_is_named_and_leaves_the_cadence_unknown() -> None:
    silent = CadenceEngine(tokens=0)
    await silent.start()
    try:
        report = await probe([chat_path("silent", silent.url)], ProbeSettings(requests=1, warmup=0))
    finally:
        await silent.stop()
    assert path(report, "silent").verdict == "no tokens"
    assert "engine cadence: unknown, silent streamed no tokens" in render(report)
