"""The header rules of a forwarding hop, on the fields as read: what crosses, byte for byte, and what this hop sets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flushgate.proxy.headers import HOP_BY_HOP, AnswerHead, end_to_end, upstream_request_lines

NAMES = st.sampled_from(
    [
        b"Connection",
        b"connection",
        b"X-Hop",
        b"x-hop",
        b"Keep-Alive",
        b"TE",
        b"Content-Type",
        b"X-Custom",
        b"Access-Control-Allow-Origin",
        b"Upgrade",
        b"Accept",
        b"Host",
    ]
)
VALUES = st.sampled_from([b"X-Hop", b"x-custom, Keep-Alive", b"close", b"caf\xe9", b"", b"a, , b", b"text/plain"])
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=12)
DROP = frozenset(name.encode() for name in HOP_BY_HOP) | {b"host"}


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = [line for line in head.split(b"\r\n") if line]
    return [(name, value) for name, _, value in (line.partition(b": ") for line in lines)]


@settings(max_examples=300, derandomize=True)
@given(FIELDS)
def test_every_field_not_dropped_crosses_as_it_came_and_in_order(raw: list[tuple[bytes, bytes]]) -> None:
    kept, dropped = end_to_end(raw, DROP, b"access-control-")
    named = {
        token.strip().lower() for name, value in raw if name.lower() == b"connection" for token in value.split(b",")
    }
    expected = [
        (name, value)
        for name, value in raw
        if name.lower() not in DROP | named and not name.lower().startswith(b"access-control-")
    ]
    assert kept == expected
    for name in {name.lower() for name, _ in raw} & (DROP | {b"access-control-allow-origin"}):
        assert dropped[name] == b", ".join(value for n, value in raw if n.lower() == name)


def test_the_request_goes_up_without_its_framing_and_hop_fields_asking_for_identity_and_naming_its_client() -> None:
    raw = [
        (b"Host", b"gateway:8080"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Content-Length", b"2"),
        (b"Accept-Encoding", b"gzip"),
        (b"X-Request-ID", b"client-id"),
        (b"Expect", b"100-continue"),
        (b"X-Note", b"caf\xe9"),
        (b"x-forwarded-for", b"10.0.0.2"),
    ]
    fields = _fields(upstream_request_lines(raw, "rid", "127.0.0.1"))
    assert fields == [
        (b"X-Note", b"caf\xe9"),  # not UTF-8: crosses as its bytes
        (b"Accept-Encoding", b"identity"),
        (b"X-Request-ID", b"rid"),
        (b"X-Forwarded-For", b"10.0.0.1, 10.0.0.2, 127.0.0.1"),  # every hop before this one, then this client
    ]
    without_client = _fields(upstream_request_lines(raw, "rid", None))
    assert (b"X-Forwarded-For", b"10.0.0.1, 10.0.0.2") in without_client
    assert b"X-Forwarded-For" not in dict(_fields(upstream_request_lines([], "rid", None)))


def test_the_answer_keeps_the_engines_fields_and_takes_the_gateways_own_in_place_of_the_engines() -> None:
    raw = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"Server-Timing", b"engine;dur=1"),
        (b"Cache-Control", b"max-age=60"),
        (b"X-Accel-Buffering", b"yes"),
        (b"X-Request-ID", b"engine-id"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"Connection", b"X-Engine-Hop"),
        (b"X-Engine-Hop", b"secret"),
        (b"transfer-encoding", b"chunked"),
        (b"X-Engine", b"caf\xe9"),
    ]
    head = AnswerHead(raw, "rid")
    head.add("Server-Timing", "gateway;dur=0.1")
    assert head.kind == "sse"
    assert not head.has_length
    assert _fields(head.lines()) == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"X-Engine", b"caf\xe9"),
        (b"X-Request-ID", b"rid"),
        (b"X-Accel-Buffering", b"no"),
        (b"Cache-Control", b"no-cache"),
        (b"Server-Timing", b"gateway;dur=0.1"),
    ]
    as_text = head.multidict()
    assert list(as_text.items()) == [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("X-Engine", "caf\udce9"),  # as aiohttp's client reads it, and written back to the same byte
        ("X-Request-ID", "rid"),
        ("X-Accel-Buffering", "no"),
        ("Cache-Control", "no-cache"),
        ("Server-Timing", "gateway;dur=0.1"),
    ]


def test_an_answer_that_is_no_stream_keeps_the_engines_caching_and_says_its_length() -> None:
    raw = [(b"Content-Type", b"application/json"), (b"Content-Length", b"11"), (b"Cache-Control", b"no-store")]
    head = AnswerHead(raw, "rid")
    assert head.kind is None
    assert head.has_length
    assert _fields(head.lines()) == [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"11"),
        (b"Cache-Control", b"no-store"),
        (b"X-Request-ID", b"rid"),
    ]
