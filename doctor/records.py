"""flushgate's per-request log records, read back and cut into where each request's time went.

A record's ``split`` says where its total went, hop by hop, in parts that add up to ``total_ms``; that is used
as written. Records from gateways older than the split are cut by their timestamps instead. Every part says
which fields it needs and is left out where they are missing: nothing is filled in by guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Record = dict[str, Any]
Hop = Literal["client", "gateway", "engine"]


@dataclass(slots=True)
class ReadStats:
    lines: int = 0
    records: int = 0


def read_records(lines: Iterable[bytes | str], stats: ReadStats | None = None) -> Iterator[Record]:
    """The ``request`` records among a gateway's JSON log lines; other events and other lines are skipped."""
    stats = stats if stats is not None else ReadStats()
    for line in lines:
        if not line.strip():
            continue
        stats.lines += 1
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(raw, dict) and raw.get("event") == "request":
            stats.records += 1
            yield raw


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(record: Record, *names: str) -> float | None:
    """The first of ``names`` that holds a number, at the top level or in the record's ``split``."""
    split = record.get("split")
    for name in names:
        for source in (record, split if isinstance(split, dict) else {}):
            if _is_number(source.get(name)):
                return float(source[name])
    return None


FIRST_TOKEN = ("first_token_ms", "first_event_ms", "first_chunk_ms")  # older records: the first chunk
LAST_TOKEN = ("last_token_ms", "last_chunk_ms")
TOTAL = ("total_ms", "duration_ms")


def _minus(value: float | None, *parts: float | None) -> float | None:
    if value is None:
        return None
    return max(0.0, value - sum(p for p in parts if p is not None))


def _between(r: Record, later: tuple[str, ...], earlier: tuple[str, ...]) -> float | None:
    end, start = number(r, *later), number(r, *earlier)
    return None if end is None or start is None else max(0.0, end - start)


def _field(*names: str) -> Callable[[Record], float | None]:
    return lambda r: number(r, *names)


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    hop: Hop
    value: Callable[[Record], float | None] = field(compare=False)


# The record's own split: parts that add up to total_ms.
SPLIT_PARTS: tuple[Part, ...] = (
    Part("client link", "client", _field("client_link_ms")),
    Part("gateway", "gateway", _field("gateway_ms")),
    Part("engine queue", "engine", _field("engine_queue_ms")),
    Part("engine prefill", "engine", _field("engine_prefill_ms")),
    Part("engine decode", "engine", _field("engine_decode_ms")),
    Part("engine front end", "engine", _field("engine_frontend_ms")),
    Part("engine", "engine", _field("engine_ms")),
)

# Records without a split: what their timestamps allow, in time order.
TIMESTAMP_PARTS: tuple[Part, ...] = (
    Part("engine response headers", "engine", _field("upstream_ttfb_ms")),
    Part("engine to first token", "engine", lambda r: _between(r, FIRST_TOKEN, ("upstream_ttfb_ms",))),
    Part("engine streaming", "engine", lambda r: _between(r, LAST_TOKEN, FIRST_TOKEN)),
    Part("after last token", "gateway", lambda r: _between(r, TOTAL, LAST_TOKEN)),
)


def _headers_after_body_and_connect(r: Record) -> float | None:
    return _minus(number(r, "upstream_ttfb_ms"), number(r, "body_read_ms"), number(r, "upstream_connect_ms"))


def _rest_to_first_token(r: Record) -> float | None:
    after_headers = _between(r, FIRST_TOKEN, ("upstream_ttfb_ms",))
    return _minus(after_headers, number(r, "engine_queue_ms"), number(r, "engine_prefill_ms"))


# Time to first token, in time order (vLLM sends its response headers before it queues the request).
FIRST_TOKEN_PARTS: tuple[Part, ...] = (
    Part("client upload", "client", _field("body_read_ms")),
    Part("connect to engine", "gateway", _field("upstream_connect_ms")),
    Part("engine response headers", "engine", _headers_after_body_and_connect),
    Part("engine queue", "engine", _field("engine_queue_ms")),
    Part("engine prefill", "engine", _field("engine_prefill_ms")),
    Part("rest until first token", "engine", _rest_to_first_token),
)

KNOWN_FIELDS: dict[str, tuple[str, ...]] = {
    "split": (),
    "body_read_ms": ("body_read_ms",),
    "upstream_ttfb_ms": ("upstream_ttfb_ms",),
    "first_token_ms": FIRST_TOKEN,
    "last_token_ms": LAST_TOKEN,
    "total_ms": TOTAL,
    "gap_p99_ms": ("gap_p99_ms",),
    "gap_max_ms": ("gap_max_ms",),
    "write_blocked_ms": ("write_blocked_ms",),
    "tokens": ("tokens",),
    "engine_queue_ms": ("engine_queue_ms",),
    "engine_prefill_ms": ("engine_prefill_ms",),
}


def has_field(record: Record, name: str) -> bool:
    if name == "split":
        return isinstance(record.get("split"), dict)
    return number(record, *KNOWN_FIELDS[name]) is not None


def _values(parts: tuple[Part, ...], record: Record) -> dict[str, float]:
    found = {}
    for part in parts:
        value = part.value(record)
        if value is not None:
            found[part.name] = value
    return found


def hop_parts(record: Record) -> dict[str, float]:
    """Where this request's time went, in ms: its own split, or what its timestamps allow."""
    return _values(SPLIT_PARTS if isinstance(record.get("split"), dict) else TIMESTAMP_PARTS, record)


def first_token_parts(record: Record) -> dict[str, float]:
    """Where the time before this request's first token went, in ms (streamed requests only)."""
    if number(record, *FIRST_TOKEN) is None:
        return {}
    return _values(FIRST_TOKEN_PARTS, record)


def hop_of(name: str) -> Hop:
    return next(p.hop for p in (*SPLIT_PARTS, *TIMESTAMP_PARTS, *FIRST_TOKEN_PARTS) if p.name == name)
