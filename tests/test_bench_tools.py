"""The benchmark's measuring tools give exact answers on inputs whose answers are known."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flushgate.bench import loadgen
from flushgate.bench.arrivals import LatePiece, arrivals
from flushgate.bench.chunk_position import by_position
from flushgate.bench.engine import start_engine
from flushgate.bench.framing import EventSplitter, FramingError, MessageParser, event_data
from flushgate.bench.loadgen import (
    Recording,
    RequestResult,
    Scenario,
    ScenarioRun,
    analyse,
    fetch_stream,
    run_scenario,
)
from flushgate.bench.procstat import parse_stat
from flushgate.bench.report import FLUSHGATE, NGINX, NGINX_AGAIN, Cell, checks
from flushgate.bench.runner import rotated
from flushgate.bench.stats import Spread, added, percentile, within
from flushgate.bench.targets import ENGINE_KEEPALIVE_S, Target, flushgate_serve_args, flushgate_tuning, nginx_config
from flushgate.cli import build_parser, config_from_args

DEADLOCK_GUARD_S = 10

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6\r\nhello \r\n"
    b"5;ext=1\r\nworld\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut ``data`` in two, and byte by byte."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


def test_chunked_body_decodes_the_same_however_the_bytes_are_split() -> None:
    for pieces in splits(CHUNKED + b"NEXT"):
        parser = MessageParser()
        body = b"".join(b for piece in pieces for b in parser.feed(piece))
        assert body == b"hello world"
        assert parser.complete
        assert parser.excess == b"NEXT"
        assert parser.head is not None
        assert parser.head.status == 200
        assert parser.head.get("content-type") == "text/event-stream"


def test_chunked_body_cut_short_is_not_complete_even_at_eof() -> None:
    parser = MessageParser()
    parser.feed(CHUNKED[:-7])  # the zero-size chunk's trailers never end
    parser.feed_eof()
    assert not parser.complete


def test_content_length_body_ends_at_its_length() -> None:
    parser = MessageParser()
    body = parser.feed(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusyHTTP")
    assert body == [b"busy"]
    assert parser.complete
    assert parser.excess == b"HTTP"


def test_body_without_length_ends_only_when_the_peer_closes() -> None:
    parser = MessageParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\nabc") == [b"abc"]
    assert not parser.complete
    parser.feed_eof()
    assert parser.complete


def test_bad_chunk_size_is_a_framing_error() -> None:
    parser = MessageParser()
    with pytest.raises(FramingError, match="chunk size"):
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_request_with_body_is_framed_by_content_length() -> None:
    parser = MessageParser(is_response=False)
    parser.feed(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert parser.complete
    assert parser.head is not None
    assert parser.head.method_and_target == ("POST", "/v1/chat/completions")


def test_events_split_at_blank_lines_however_the_bytes_are_split() -> None:
    stream = b'data: {"a":1}\n\ndata: [DONE]\r\n\r\ndata: partial'
    for pieces in splits(stream):
        splitter = EventSplitter()
        events = [e for piece in pieces for e in splitter.feed(piece)]
        assert events == [b'data: {"a":1}', b"data: [DONE]"]
        assert splitter.pending == b"data: partial"


def test_event_data_joins_data_lines_and_ignores_other_fields() -> None:
    assert event_data(b"event: x\ndata: one\ndata:two") == b"one\ntwo"
    assert event_data(b": comment") is None


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 99) == pytest.approx(4.96)
    assert percentile([10, 20], 50) == 15
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_added_is_the_difference_of_each_percentile_against_direct() -> None:
    assert added(Spread(3, 2.0, 9.0), Spread(3, 0.5, 1.0)) == (1.5, 8.0)
    assert added(None, Spread(3, 0.5, 1.0)) is None


def test_within_uses_the_ratio_above_the_noise_floor_and_the_allowance_below_it() -> None:
    assert within(1.4, 1.0, factor=1.5, slack=0.3)
    assert not within(1.6, 1.0, factor=1.5, slack=0.3)
    assert within(0.25, 0.01, factor=1.5, slack=0.3)  # reference adds ~0: the absolute allowance decides
    assert not within(0.35, 0.01, factor=1.5, slack=0.3)
    assert within(-0.5, -1.1, factor=1.5, slack=0.3)  # nothing added over direct meets a goal on added time
    assert not within(0.1, -1.1, factor=1.5, slack=0.3)


def _token(seq: int, sent_ns: int) -> bytes:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"t%d:%d"}}]}\n\n' % (seq, sent_ns)
    return b"%x\r\n%s\r\n" % (len(event), event)


def test_analysis_matches_each_event_with_the_arrival_of_the_piece_that_completed_it() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    token1 = _token(1, 1_500)
    end = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    recording = Recording(
        started_ns=1_000,
        pieces=[
            (1_200, head + _token(0, 1_100)),
            (1_700, token1[:20]),  # token 1 is not whole yet
            (2_000, token1[20:] + end),
        ],
    )
    result = analyse(recording, expected_tokens=2)
    assert result.ttft_ns == 200
    assert result.delays_ns == [100, 500]
    assert result.ok
    assert result.in_order


def test_arrivals_list_the_pieces_in_which_a_token_had_waited_and_when_they_came() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    stalled = _token(1, 1_000_000) + _token(2, 1_100_000) + _token(3, 2_900_000)
    recording = Recording(
        started_ns=0,
        pieces=[
            (1_000_000, head + _token(0, 950_000)),  # waited 0.05 ms
            (3_000_000, stalled),  # waited 2.0, 1.9 and 0.1 ms
            (3_100_000, _token(4, 3_000_000) + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"),
        ],
    )
    seen = arrivals(recording, late_ms=0.5)
    assert seen.pieces == 3
    assert seen.largest_piece == len(stalled)
    assert seen.span_ms == pytest.approx(2.1)
    assert seen.late_pieces == 1
    assert seen.late == [LatePiece(at_ms=2.0, size=len(stalled), tokens=3, first_seq=1, waited_ms=2.0)]
    assert seen.delay_p50_ms == pytest.approx(0.1)
    assert arrivals(recording, late_ms=0.5, keep=0).late == []
    assert arrivals(recording, late_ms=0.5, keep=0).late_pieces == 1


def test_analysis_calls_a_stream_without_its_end_incomplete() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    recording = Recording(started_ns=0, pieces=[(10, head + _token(0, 5))], eof=True)
    result = analyse(recording, expected_tokens=2)
    assert result.error is None
    assert not result.complete


def test_analysis_reports_an_error_status() -> None:
    recording = Recording(started_ns=0, pieces=[(10, b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")])
    assert analyse(recording, expected_tokens=1).error == "status 502"


async def _through_the_fake_engine(scenario: Scenario) -> ScenarioRun:
    server, port = await start_engine()
    try:
        return await run_scenario("127.0.0.1", port, scenario)
    finally:
        server.close()


async def test_fake_engine_streams_reach_the_load_generator_whole_and_in_order() -> None:
    scenario = Scenario("tiny", streams=2, requests=1, tokens=5, interval_us=1000, deadline_s=DEADLOCK_GUARD_S)
    results = (await _through_the_fake_engine(scenario)).results()
    assert len(results) == 2
    for result in results:
        assert result.error is None
        assert result.complete
        assert result.in_order
        assert result.tokens == 5
        assert result.ttft_ns is not None
        assert result.ttft_ns > 0
        assert all(delay >= 0 for delay in result.delays_ns)


async def test_a_back_to_back_stream_gives_up_the_core_after_every_sixteen_tokens_that_more_follow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    scenario = Scenario("b2b", streams=1, requests=1, tokens=64, interval_us=0, deadline_s=DEADLOCK_GUARD_S)
    (result,) = (await _through_the_fake_engine(scenario)).results()
    assert result.complete
    assert result.tokens == 64
    assert len(yields) == 3  # after tokens 16, 32 and 48; the 64th ends the stream


async def test_no_garbage_collection_runs_in_the_load_generator_while_a_scenario_measures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []

    async def noting(host: str, port: int, request: bytes, deadline_ns: int) -> Recording:
        seen.append(gc.isenabled())
        return Recording(started_ns=time.monotonic_ns(), eof=True)

    monkeypatch.setattr(loadgen, "fetch_stream", noting)
    assert gc.isenabled()
    scenario = Scenario("tiny", streams=3, requests=1, tokens=1, interval_us=1000, deadline_s=DEADLOCK_GUARD_S)
    await run_scenario("127.0.0.1", 9, scenario)
    assert seen == [False, False, False]
    assert gc.isenabled()


async def test_load_generator_counts_a_stream_cut_by_the_server_as_incomplete() -> None:
    async def half_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _token(0, 1))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half_stream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        request = Scenario("cut", 1, 1, 3, 1000, DEADLOCK_GUARD_S).request_bytes("127.0.0.1", port, "k")
        deadline_ns = time.monotonic_ns() + DEADLOCK_GUARD_S * 1_000_000_000
        recording = await fetch_stream("127.0.0.1", port, request, deadline_ns)
    finally:
        server.close()
    result = analyse(recording, expected_tokens=3)
    assert result.tokens == 1
    assert not result.complete
    assert not result.ok


def test_proc_stat_fields_are_found_after_a_command_name_with_spaces_and_parens() -> None:
    text = "42 (nginx: worker (x)) S 7 42 42 0 -1 4194624 10 0 0 0 150 25 0 0 20 0 1 0 100 1000 50"
    assert parse_stat(text) == (7, 175)


def test_each_round_starts_with_the_next_target() -> None:
    targets = [Target(name, 0) for name in ("a", "b", "c")]
    assert [[t.name for t in rotated(targets, r)] for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def _cell(delays_ms: list[float]) -> Cell:
    return Cell(ttft_ms=[1.0], delay_ms=delays_ms, chunks=len(delays_ms), elapsed_s=1.0, cpu_s=0.1, requests=1)


def test_delay_goal_is_met_within_one_and_a_half_times_nginx_and_not_beyond() -> None:
    direct = [1.0] * 100
    near = {"s": {"engine-direct": _cell(direct), NGINX: _cell([3.0] * 100), FLUSHGATE: _cell([4.0] * 100)}}
    far = {"s": {"engine-direct": _cell(direct), NGINX: _cell([3.0] * 100), FLUSHGATE: _cell([5.0] * 100)}}
    assert checks(near, stress="s", many="s")[0].met is True  # adds 3.0 ms against nginx's 2.0
    assert checks(far, stress="s", many="s")[0].met is False  # adds 4.0 ms against nginx's 2.0


def test_the_goals_can_judge_a_second_nginx_in_flushgates_place() -> None:
    direct = [1.0] * 100
    cells = {"engine-direct": _cell(direct), NGINX: _cell([3.0] * 100), FLUSHGATE: _cell([9.0] * 100)}
    results = {"s": cells | {NGINX_AGAIN: _cell([4.0] * 100)}}
    for_flushgate = checks(results, stress="s", many="s")
    for_nginx_again = checks(results, stress="s", many="s", candidate=NGINX_AGAIN)
    assert for_flushgate[0].met is False  # flushgate adds 8.0 ms against nginx's 2.0
    assert for_nginx_again[0].met is True  # the second nginx adds 3.0
    assert "s p50: 3.000 vs nginx 2.000" in for_nginx_again[0].detail
    assert checks({"s": cells}, stress="s", many="s", candidate=NGINX_AGAIN)[1].detail == (
        "nginx-again or nginx not measured"
    )


def test_chunk_delays_are_split_by_the_tokens_place_and_the_slowest_found_where_they_are() -> None:
    ms = 1_000_000
    results = [RequestResult(200, ms, [(i + 1) * ms] + [ms // 2] * 9, 10, True, True, None, None) for i in range(100)]
    table = by_position(results)
    assert list(table) == ["token 0", "token 1", "token 2", "tokens 3-5", "token 6 on"]
    assert table["token 0"] == {"chunks": 100, "p50_ms": 50.5, "p99_ms": 99.01, "share_of_slowest_1pc": 1.0}
    assert table["token 1"] == {"chunks": 100, "p50_ms": 0.5, "p99_ms": 0.5, "share_of_slowest_1pc": 0.0}
    assert table["tokens 3-5"]["chunks"] == 300
    assert table["token 6 on"]["chunks"] == 400
    assert by_position([]) == {}


def test_both_proxies_keep_idle_engine_connections_equally_long_and_extra_flags_win(tmp_path: Path) -> None:
    argv = flushgate_serve_args([8001, 8002], 9000, 1)
    config = config_from_args(build_parser().parse_args(argv))
    assert config.timeouts.engine_keepalive == ENGINE_KEEPALIVE_S == 60
    assert f"keepalive_timeout {ENGINE_KEEPALIVE_S:g}s;" in nginx_config(tmp_path, [8001, 8002], 9000)
    told = build_parser().parse_args(flushgate_serve_args([8001], 9000, 1, ["--engine-keepalive", "4"]))
    assert config_from_args(told).timeouts.engine_keepalive == 4


def test_the_reports_version_line_names_every_tuning_flag_and_no_address() -> None:
    tuning = flushgate_tuning(2, ["--idle-timeout", "0"])
    assert tuning == ["--workers", "2", "--engine-keepalive", "60", "--idle-timeout", "0"]
    argv = flushgate_serve_args([8001], 9000, 2, ["--idle-timeout", "0"])
    assert argv[-len(tuning) :] == tuning


def test_a_second_nginx_beside_flushgate_is_judged_too_and_shown_as_the_noise_floor(tmp_path: Path) -> None:
    from flushgate.bench.runner import noise_floor_checks, write_outputs

    direct = [1.0] * 100
    cells = {"engine-direct": _cell(direct), NGINX: _cell([3.0] * 100), FLUSHGATE: _cell([9.0] * 100)}
    results = {"s": cells | {NGINX_AGAIN: _cell([4.0] * 100)}}
    floor = noise_floor_checks(results, FLUSHGATE, stress="s", many="s")
    assert [check.met for check in floor] == [True, True, True]  # delay, stress TTFT, CPU: the other two are ours
    assert "s p50: 3.000 vs nginx 2.000" in floor[0].detail
    assert noise_floor_checks({"s": cells}, FLUSHGATE, stress="s", many="s") == []  # no second nginx
    assert noise_floor_checks(results, NGINX_AGAIN, stress="s", many="s") == []  # it is the one judged already

    from dataclasses import asdict

    machine = {"cpu_model": "x", "nproc": 2, "kernel": "k", "python": "3", "date_utc": "d", "commit": "c"}
    data = {
        "machine": machine,
        "pinning": {"load_and_engine_cpu": 0, "proxy_cpu": 1, "nice": 0},
        "engines": 4,
        "judged": FLUSHGATE,
        "versions": {},
        "not_measured": {},
        "rounds": 1,
        "scenarios": [{"name": "s", "title": "s"}],
        "results": {},
        "checks": [asdict(c) for c in checks(results, stress="s", many="s")],
        "noise_floor_checks": [asdict(c) for c in floor],
    }
    write_outputs(tmp_path, data, plot=False)
    text = (tmp_path / "results.md").read_text()
    goals, _, rest = text.partition("## The same goals for nginx-again")
    assert "**not met**" in goals  # flushgate adds 8.0 ms against nginx's 2.0
    assert "s p50: 3.000 vs nginx 2.000 ms ok" in rest.partition("## Per scenario")[0]
    data["noise_floor_checks"] = []
    write_outputs(tmp_path, data, plot=False)
    assert "## The same goals for nginx-again" not in (tmp_path / "results.md").read_text()
