"""The per-request record's JSON line, written without structlog's generic path, is the line structlog's chain
(as ``flushgate.logs.configure`` sets it up for JSON) writes for the same event: the same keys, in the same order,
with the same values, and a timestamp in the same form; and the milliseconds in it are cheap to make but the
same to the microsecond."""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from flushgate.logs import RecordLines, processors
from flushgate.record import RequestRecord
from flushgate.timings import RequestTimings, now, to_ms

TIMESTAMP = re.compile(rb'"timestamp":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z)"')


class Opaque:
    """A value JSON has no form for: structlog's renderer falls back to its repr."""

    def __repr__(self) -> str:
        return "<opaque>"


def both_lines(fields: dict[str, Any], worker: int | None) -> tuple[bytes, bytes]:
    via_structlog = io.BytesIO()
    log = structlog.wrap_logger(
        structlog.BytesLogger(via_structlog),
        processors=processors(console=False, worker=worker),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind(source="gateway")
    log.info("request", **fields)
    direct = io.BytesIO()
    RecordLines(direct, worker).writer(structlog.get_context(log))(fields)
    return via_structlog.getvalue(), direct.getvalue()


def same_but_the_time(structlog_line: bytes, direct_line: bytes) -> None:
    """Equal bytes once each timestamp (taken a moment apart) is blanked; both in structlog's form."""
    for line in (structlog_line, direct_line):
        assert line.endswith(b"}\n")
        assert line.count(b"\n") == 1
        assert len(TIMESTAMP.findall(line)) == 1, line
    assert TIMESTAMP.sub(b"", direct_line) == TIMESTAMP.sub(b"", structlog_line)


def a_real_record() -> dict[str, Any]:
    start = now()
    timings = RequestTimings(
        start=start, body_done=start + 1e-5, upstream_call=start + 2e-5, upstream_headers=start + 0.03
    )
    timings.arrivals.extend([start + 0.03, start + 0.031, start + 0.045])
    timings.first_token, timings.end = start + 0.031, start + 0.05
    record = RequestRecord(request_id="abc", method="POST", path="/v1/chat/completions", timings=timings,
                           model="m", stream=True, status=200, served_by="http://127.0.0.1:8000")  # fmt: skip
    record.failover.append({"engine": "http://127.0.0.1:8001", "error": "connect refused"})
    return record.fields()


@pytest.mark.parametrize("worker", [None, 3])
def test_a_real_records_line_is_structlogs_line(worker: int | None) -> None:
    structlog_line, direct_line = both_lines(a_real_record(), worker)
    same_but_the_time(structlog_line, direct_line)
    parsed = orjson.loads(direct_line)
    assert parsed["event"] == "request"
    assert parsed["level"] == "info"
    assert parsed["source"] == "gateway"
    assert parsed.get("worker") == worker
    assert parsed["failover"] == [{"engine": "http://127.0.0.1:8001", "error": "connect refused"}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.text(min_size=1, max_size=12).filter(lambda k: k not in {"event", "level", "timestamp", "worker"})


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(field_names, json_values | st.just(Opaque()), max_size=12),
       worker=st.none() | st.integers(0, 63))  # fmt: skip
def test_any_fields_give_structlogs_line(fields: dict[str, Any], worker: int | None) -> None:
    structlog_line, direct_line = both_lines(fields, worker)
    same_but_the_time(structlog_line, direct_line)


@given(st.floats(min_value=-1e5, max_value=1e5, allow_nan=False))
def test_milliseconds_are_the_seconds_to_the_microsecond(seconds: float) -> None:
    ms = to_ms(seconds)
    assert abs(ms - seconds * 1000) <= 0.0005 + 1e-9 * abs(seconds * 1000)
    assert ms == round(ms, 3)  # printed with at most three decimals, as ``round(x, 3)`` gave them
