"""flushgate's per-request log records, read back and cut into the stages of a request's life.

Records from older and newer gateways carry different fields, so every stage says which fields it needs and is
left out where they are missing; nothing is filled in by guess.
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
    not_json: int = 0


def _flatten(raw: dict[str, Any]) -> Record:
    """Nested groups (``{"timings": {...}}``) are read as if their fields were top-level ones."""
    flat: Record = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                flat.setdefault(inner, inner_value)
        else:
            flat[key] = value
    return flat


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
            stats.not_json += 1
            continue
        if isinstance(raw, dict) and raw.get("event") == "request":
            stats.records += 1
            yield _flatten(raw)


def number(record: Record, *names: str) -> float | None:
    """The first of ``names`` that holds a number."""
    for name in names:
        value = record.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def total_ms(r: Record) -> float | None:
    return number(r, "total_ms", "duration_ms")


def ttfb_ms(r: Record) -> float | None:
    return number(r, "upstream_ttfb_ms")


def first_token_ms(r: Record) -> float | None:
    """Older records know only the first chunk, which may be an event without text: close, not the same."""
    return number(r, "first_token_ms", "ttft_ms", "first_event_ms", "first_chunk_ms")


def last_token_ms(r: Record) -> float | None:
    return number(r, "last_token_ms", "last_event_ms", "last_chunk_ms")


def _minus(value: float | None, *parts: float | None) -> float | None:
    if value is None:
        return None
    return max(0.0, value - sum(p for p in parts if p is not None))


def _engine_headers(r: Record) -> float | None:
    return _minus(ttfb_ms(r), number(r, "body_read_ms"), number(r, "upstream_connect_ms"))


def _to_first_token(r: Record) -> float | None:
    first, ttfb = first_token_ms(r), ttfb_ms(r)
    if first is None or ttfb is None:
        return None
    return _minus(first - ttfb, number(r, "engine_queue_ms"), number(r, "engine_prefill_ms"))


def _streaming(r: Record) -> float | None:
    first, last = first_token_ms(r), last_token_ms(r)
    if first is None or last is None:
        return None
    decode = number(r, "engine_decode_ms")
    return decode if decode is not None else _minus(last - first, number(r, "write_blocked_ms"))


def _relay_while_streaming(r: Record) -> float | None:
    first, last, decode = first_token_ms(r), last_token_ms(r), number(r, "engine_decode_ms")
    if first is None or last is None or decode is None:
        return None
    return _minus(last - first, decode, number(r, "write_blocked_ms"))


def _after_last_token(r: Record) -> float | None:
    total, last = total_ms(r), last_token_ms(r)
    return _minus(total, last) if last is not None else None


def _field(name: str) -> Callable[[Record], float | None]:
    return lambda r: number(r, name)


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    hop: Hop
    before_first_token: bool
    value: Callable[[Record], float | None] = field(compare=False)


# In time order; together they cover a request from its first byte to its last.
STAGES: tuple[Stage, ...] = (
    Stage("client upload", "client", True, _field("body_read_ms")),
    Stage("connect to engine", "gateway", True, _field("upstream_connect_ms")),
    Stage("engine response headers", "engine", True, _engine_headers),
    Stage("engine queue", "engine", True, _field("engine_queue_ms")),
    Stage("engine prefill", "engine", True, _field("engine_prefill_ms")),
    Stage("to first token", "engine", True, _to_first_token),
    Stage("engine decode", "engine", False, _streaming),
    Stage("relay while streaming", "gateway", False, _relay_while_streaming),
    Stage("client reading (writes blocked)", "client", False, _field("write_blocked_ms")),
    Stage("after last token", "gateway", False, _after_last_token),
)

KNOWN_FIELDS = (
    "body_read_ms",
    "upstream_connect_ms",
    "upstream_ttfb_ms",
    "first_token_ms",
    "last_token_ms",
    "total_ms",
    "gap_p99_ms",
    "gap_max_ms",
    "write_blocked_ms",
    "tokens",
    "engine_queue_ms",
    "engine_prefill_ms",
    "engine_decode_ms",
)
_ALIASES = {
    "first_token_ms": ("first_token_ms", "ttft_ms", "first_event_ms", "first_chunk_ms"),
    "last_token_ms": ("last_token_ms", "last_event_ms", "last_chunk_ms"),
    "total_ms": ("total_ms", "duration_ms"),
}


def has_field(record: Record, name: str) -> bool:
    return number(record, *_ALIASES.get(name, (name,))) is not None


def stage_times(record: Record) -> dict[str, float]:
    """Each stage this record has the fields for, in ms."""
    times: dict[str, float] = {}
    for stage in STAGES:
        value = stage.value(record)
        if value is not None:
            times[stage.name] = value
    return times
