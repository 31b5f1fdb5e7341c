"""Incremental decoding of a streamed chat answer, one network read at a time.

The doctor times reads, not parsed objects, so the decoder must say for every read how many events it completed,
how many of them carried text, and whether an event was left half-way: a hop that flushes fixed-size blocks
splits events, one that flushes whole events does not.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

StreamFormat = Literal["sse", "ndjson"]

_DECODABLE = {"gzip": zlib.MAX_WBITS | 32, "x-gzip": zlib.MAX_WBITS | 32, "deflate": zlib.MAX_WBITS | 32}


@dataclass(slots=True)
class ReadResult:
    events: int = 0
    tokens: int = 0  # events that carried answer text (one token each for vLLM)
    done: bool = False  # the stream's end marker: ``data: [DONE]`` or ``"done": true``
    error: str | None = None  # an error event's message
    partial: bool = False  # the read ended inside an event


def stream_format(content_type: str | None) -> StreamFormat | None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        return "ndjson"
    return None


def _error_message(payload: Any) -> str | None:
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    error = payload["error"]
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)
    return str(error)


def _has_text(payload: Any) -> bool:
    """OpenAI chat/completions chunks and Ollama chat/generate lines, answer or reasoning text."""
    if not isinstance(payload, dict):
        return False
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "reasoning_content", "reasoning")):
            return True
        if choice.get("text"):
            return True
    message = payload.get("message")
    if isinstance(message, dict) and (message.get("content") or message.get("thinking")):
        return True
    return bool(payload.get("response") or payload.get("thinking"))


class EventDecoder:
    """Feed it each read's bytes (still content-encoded, as they came off the wire)."""

    def __init__(self, fmt: StreamFormat, content_encoding: str | None = None) -> None:
        self.format = fmt
        encoding = (content_encoding or "identity").strip().lower()
        self.decodable = encoding in ("identity", "") or encoding in _DECODABLE
        self._inflate = zlib.decompressobj(_DECODABLE[encoding]) if encoding in _DECODABLE else None
        self._line = b""
        self._data: list[bytes] = []  # data lines of the SSE event being read

    def feed(self, raw: bytes) -> ReadResult:
        result = ReadResult()
        if not self.decodable:
            return result
        data = self._inflate.decompress(raw) if self._inflate is not None else raw
        lines = (self._line + data).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            self._line_done(line.rstrip(b"\r"), result)
        result.partial = bool(self._line or self._data)
        return result

    def _line_done(self, line: bytes, result: ReadResult) -> None:
        if self.format == "ndjson":
            if line.strip():
                self._event(line, result)
            return
        if not line:
            if self._data:
                self._event(b"\n".join(self._data), result)
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)

    def _event(self, body: bytes, result: ReadResult) -> None:
        result.events += 1
        if body.strip() == b"[DONE]":
            result.done = True
            return
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        message = _error_message(payload)
        if message is not None:
            result.error = message
        elif _has_text(payload):
            result.tokens += 1
        if isinstance(payload, dict) and payload.get("done") is True and self.format == "ndjson":
            result.done = True
