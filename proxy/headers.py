"""Header rules for a forwarding hop: what crosses it, what is dropped, what is added."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Literal

from multidict import CIMultiDict, MultiMapping

# RFC 9110 7.6.1: connection-specific fields, plus the ones older peers still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
REQUEST_ID = "X-Request-ID"
REQUEST_ID_FIELD = REQUEST_ID.lower().encode()  # as raw fields are looked up

StreamKind = Literal["sse", "ndjson"]


class _RequestIds:
    """32 hex digits, unique without asking the kernel for randomness per request (a ``getrandom`` call each, as
    ``uuid4`` makes): 16 random ones drawn once per process, again in a forked child, then a counter."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds().next


RawHeaders = Sequence[tuple[bytes, bytes]]  # a head's fields as read: names and values as their bytes
_HOP_BY_HOP_RAW = frozenset(name.encode() for name in HOP_BY_HOP)
# Set again by this hop (a body's length by the framing it goes out with): the incoming ones never cross.
_NOT_FORWARDED_UP = _HOP_BY_HOP_RAW | {b"host", b"accept-encoding", REQUEST_ID_FIELD, b"expect", b"content-length",
                                       b"x-forwarded-for"}  # fmt: skip
_NOT_FORWARDED_DOWN = _HOP_BY_HOP_RAW | {REQUEST_ID_FIELD, b"server-timing"}
_SET_ON_STREAMS = frozenset({b"x-accel-buffering", b"cache-control"})
_CORS_PREFIX = b"access-control-"  # the engine's CORS fields never reach a client: proxy/cors.py answers for itself


def end_to_end(
    raw: RawHeaders, drop: frozenset[bytes], drop_prefix: bytes | None = None
) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes]]:
    """The fields of ``raw`` that cross this hop: all but those named in ``drop`` (lower case) or starting with
    ``drop_prefix``, and those the message's own ``Connection`` field names; and the value of each dropped name
    (a name sent on several lines: its values joined with commas, as RFC 9110 5.3 reads such a list).

    Bytes in, bytes out: what a hop forwards it need not decode, and a field crosses exactly as it came."""
    kept: list[tuple[bytes, bytes]] = []
    dropped: dict[bytes, bytes] = {}
    for pair in raw:
        lowered = pair[0].lower()
        if lowered in drop or (drop_prefix is not None and lowered.startswith(drop_prefix)):
            prior = dropped.get(lowered)
            dropped[lowered] = pair[1] if prior is None else prior + b", " + pair[1]
        else:
            kept.append(pair)
    connection = dropped.get(b"connection")
    if connection is not None:
        named = {token.strip().lower() for token in connection.split(b",")}
        kept = [pair for pair in kept if pair[0].lower() not in named]
    return kept, dropped


def first_value(raw: RawHeaders, name: bytes) -> str | None:
    """The first value of the field ``name`` (lower case), as UTF-8 text."""
    for field, value in raw:
        if field.lower() == name:
            return value.decode("utf-8", "surrogateescape")
    return None


def header_lines(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([name + b": " + value + b"\r\n" for name, value in fields])


def upstream_request_lines(raw: RawHeaders, request_id: str, client_ip: str | None) -> bytes:
    """The header lines sent upstream: the client's end-to-end fields, asking for an uncompressed body, naming the
    request and where it came from. The body's framing is added where the request goes out."""
    kept, dropped = end_to_end(raw, _NOT_FORWARDED_UP)
    lines = header_lines(kept) + b"Accept-Encoding: identity\r\nX-Request-ID: " + request_id.encode() + b"\r\n"
    forwarded = dropped.get(b"x-forwarded-for")
    if client_ip:
        forwarded = forwarded + b", " + client_ip.encode() if forwarded else client_ip.encode()
    if forwarded:
        lines += b"X-Forwarded-For: " + forwarded + b"\r\n"
    return lines


def message_head(start_line: str, headers: MultiMapping[str], framing: bytes = b"") -> bytes:
    """An HTTP/1.1 head: ``start_line`` (CRLF-ended), the headers, the gateway's own framing lines, the blank line.
    Text goes back to the bytes it was read from (surrogateescape undoes the UTF-8 decoding of header values)."""
    lines = [start_line, *(f"{name}: {value}\r\n" for name, value in headers.items())]
    return "".join(lines).encode("utf-8", "surrogateescape") + framing + b"\r\n"


def stream_kind(content_type: str | None) -> StreamKind | None:
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        return "ndjson"
    return None


class AnswerHead:
    """The head of the client's answer: the engine's end-to-end fields as read, and the gateway's own.

    The gateway's own server writes it as bytes (``lines``); aiohttp's gets it as a multidict (``multidict``)."""

    __slots__ = ("added", "forwarded", "has_length", "kind")

    def __init__(self, upstream: RawHeaders, request_id: str) -> None:
        self.forwarded = end_to_end(upstream, _NOT_FORWARDED_DOWN, _CORS_PREFIX)[0]
        content_type: str | None = None
        self.has_length = False
        for name, value in self.forwarded:
            lowered = name.lower()
            if lowered == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            elif lowered == b"content-length":
                self.has_length = True
        self.kind = stream_kind(content_type)  # the stream that follows, if the body is one
        self.added: list[tuple[str, str]] = [(REQUEST_ID, request_id)]
        if self.kind is not None:  # what keeps later hops from buffering a stream
            self.forwarded = [pair for pair in self.forwarded if pair[0].lower() not in _SET_ON_STREAMS]
            self.added += [("X-Accel-Buffering", "no"), ("Cache-Control", "no-cache")]

    def add(self, name: str, value: str) -> None:
        """A field of the gateway's own (one it does not take from the engine: see ``_NOT_FORWARDED_DOWN``)."""
        self.added.append((name, value))

    def lines(self) -> bytes:
        added = "".join([f"{name}: {value}\r\n" for name, value in self.added])
        return header_lines(self.forwarded) + added.encode("utf-8", "surrogateescape")

    def multidict(self) -> CIMultiDict[str]:
        # As aiohttp's client reads them: UTF-8, and bytes that are not kept as they were (surrogateescape).
        out = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self.forwarded
        )
        out.extend(self.added)
        return out
