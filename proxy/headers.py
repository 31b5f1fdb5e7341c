"""Header rules for a forwarding hop: what crosses it, what is dropped, what is added."""

from __future__ import annotations

import itertools
import os
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


def _named_in_connection(headers: MultiMapping[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def _end_to_end(headers: MultiMapping[str], also_drop: frozenset[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | also_drop | _named_in_connection(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


_NOT_FORWARDED_UP = frozenset({"host", "accept-encoding", "x-request-id", "expect"})  # Expect: answered on this hop
_NOT_FORWARDED_DOWN = frozenset({"x-request-id"})


def upstream_request_headers(incoming: MultiMapping[str], request_id: str, client_ip: str | None) -> CIMultiDict[str]:
    """End-to-end headers of the client's request, asking upstream for an uncompressed body."""
    out = _end_to_end(incoming, _NOT_FORWARDED_UP)
    out["Accept-Encoding"] = "identity"
    out[REQUEST_ID] = request_id
    if client_ip:
        prior = incoming.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    return out


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


def client_response_headers(upstream: MultiMapping[str], request_id: str) -> CIMultiDict[str]:
    """End-to-end headers of the upstream response, plus what keeps later hops from buffering a stream."""
    out = _end_to_end(upstream, _NOT_FORWARDED_DOWN)
    out[REQUEST_ID] = request_id
    if stream_kind(upstream.get("Content-Type")) is not None:
        out["X-Accel-Buffering"] = "no"
        out["Cache-Control"] = "no-cache"
    return out
