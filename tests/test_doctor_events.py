"""The stream decoder counts the same events and tokens however the bytes were cut into reads."""

from __future__ import annotations

import itertools
import zlib

import orjson
from hypothesis import given
from hypothesis import strategies as st

from flushgate.doctor.events import EventDecoder, ReadResult, StreamFormat


def sse(delta: dict[str, str]) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def ndjson(content: str, done: bool = False) -> bytes:
    return orjson.dumps({"message": {"role": "assistant", "content": content}, "done": done}) + b"\n"


WORDS = ["Hello", ",", " wor", "ld", "!"]
SSE_BODY = (
    sse({"role": "assistant", "content": ""}) + b"".join(sse({"content": w}) for w in WORDS) + b"data: [DONE]\n\n"
)
NDJSON_BODY = b"".join(ndjson(w) for w in WORDS) + ndjson("", done=True)


def feed_in_pieces(fmt: StreamFormat, body: bytes, cuts: list[int], encoding: str | None = None) -> list[ReadResult]:
    decoder = EventDecoder(fmt, encoding)
    bounds = [0, *sorted(set(cuts)), len(body)]
    return [decoder.feed(body[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def totals(results: list[ReadResult]) -> tuple[int, int, bool]:
    return sum(r.events for r in results), sum(r.tokens for r in results), any(r.done for r in results)


@given(st.lists(st.integers(min_value=1, max_value=len(SSE_BODY) - 1), max_size=30))
def test_sse_counts_do_not_depend_on_where_reads_end(cuts: list[int]) -> None:
    assert totals(feed_in_pieces("sse", SSE_BODY, cuts)) == (len(WORDS) + 2, len(WORDS), True)


@given(st.lists(st.integers(min_value=1, max_value=len(NDJSON_BODY) - 1), max_size=30))
def test_ndjson_counts_do_not_depend_on_where_reads_end(cuts: list[int]) -> None:
    assert totals(feed_in_pieces("ndjson", NDJSON_BODY, cuts)) == (len(WORDS) + 1, len(WORDS), True)


@given(st.lists(st.integers(min_value=1, max_value=len(SSE_BODY) - 1), max_size=30))
def test_crlf_line_ends_count_the_same(cuts: list[int]) -> None:
    body = SSE_BODY.replace(b"\n", b"\r\n")
    assert totals(feed_in_pieces("sse", body, cuts)) == (len(WORDS) + 2, len(WORDS), True)


def test_a_read_that_ends_inside_an_event_is_marked_partial() -> None:
    first = sse({"content": "a"})
    results = feed_in_pieces("sse", first + first, [len(first) + 5])
    assert [(r.tokens, r.partial) for r in results] == [(1, True), (1, False)]


def test_gzip_is_decoded_as_it_arrives_when_each_event_is_flushed() -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    decoder = EventDecoder("sse", "gzip")
    tokens = []
    for word in WORDS:
        tokens.append(decoder.feed(packer.compress(sse({"content": word})) + packer.flush(zlib.Z_SYNC_FLUSH)).tokens)
    assert tokens == [1] * len(WORDS)


def test_an_unknown_content_coding_counts_nothing_rather_than_guessing() -> None:
    decoder = EventDecoder("sse", "br")
    assert not decoder.decodable
    assert decoder.feed(SSE_BODY).events == 0


def test_error_events_and_reasoning_text_are_recognised() -> None:
    error = b'data: {"error": {"message": "the engine sent nothing for 5 s", "code": "idle_timeout"}}\n\n'
    got = EventDecoder("sse").feed(sse({"reasoning_content": "hmm"}) + error)
    assert (got.tokens, got.error) == (1, "the engine sent nothing for 5 s")
    line = EventDecoder("ndjson").feed(b'{"error": "model not found"}\n')
    assert line.error == "model not found"
