"""Event framing does not depend on how the engine's bytes are split into reads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flushgate.proxy.ollama.settings import parse_thinking_aliases
from flushgate.proxy.ollama.sse import SseEvents

payloads = st.lists(
    st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=40).map(str.encode), max_size=8
)


def stream_of(datas: list[bytes], crlf: bool) -> bytes:
    newline = b"\r\n" if crlf else b"\n"
    out = b""
    for i, data in enumerate(datas):
        if i % 3 == 1:
            out += b": keep-alive" + newline + newline  # a comment event, as vLLM's keep-alives
        out += b"data: " + data + newline + newline
    return out


@given(datas=payloads, crlf=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_events_come_out_whole_and_in_order_however_the_bytes_are_cut(
    datas: list[bytes], crlf: bool, cuts: list[int]
) -> None:
    raw = stream_of(datas, crlf)
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    frames = SseEvents()
    got: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        got += frames.feed(raw[start:end])
    assert got == datas
    assert not frames.pending


def test_a_multi_line_data_field_is_joined_with_newlines() -> None:
    assert SseEvents().feed(b"event: x\ndata: a\ndata:b\nid: 3\n\n") == [b"a\nb"]


def test_an_unfinished_event_is_pending_until_its_blank_line() -> None:
    frames = SseEvents()
    assert frames.feed(b'data: {"a": 1}\n') == []
    assert frames.pending
    assert frames.feed(b"\n") == [b'{"a": 1}']


def test_thinking_aliases_parse_from_tag_on_off_pairs() -> None:
    assert parse_thinking_aliases("think=on, nothink=off,deep=true") == {"think": True, "nothink": False, "deep": True}
    assert parse_thinking_aliases("") == {}
    for bad in ("think", "think=maybe", "a:b=on", "=on"):
        with pytest.raises(ValueError, match="TAG=on or TAG=off"):
            parse_thinking_aliases(bad)
